import typer

app = typer.Typer()


@app.command()
def demo() -> None:
    print("demo")


def main() -> None:
    app()
