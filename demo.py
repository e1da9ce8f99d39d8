"""`kdcache demo`: every stage of the product on a tiny sorting task, on CPU, callable from
Python (`run_demo(out)`); stage lines go to stderr, `demo_table(result["rows"])` renders the
result table the command prints on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.pipelines import Stages, adpa_from, adpa_plus, announce, pbsd, tgpo_rounds

DEMO_METHODS = ("sft", "seqkd", "kd", "kd-teacher2", "kd-2teachers", "dckd", "dckd-code", "adpa", "adpa-code",
                "adpa+", "tvkd", "tvkd-g0.7", "tvkd-a0", "dpo", "tgpo", "pbsd", "sft-xtok", "kd-xtok", "uld-xtok")
# a second teacher, trained like the first from another seed (METHODS §4's ensemble rows)
TEACHER2_SEED = 100
TWO_TEACHERS = {"kd-teacher2", "kd-2teachers"}
# Rows whose student has another tokenizer than the teacher's (METHODS §5): character BPE
# gluing " 2", "1 2" and " : " (train/tiny.py build_split_tokenizer), SFT'd on the same corpus.
XTOK_METHODS = ("sft-xtok", "kd-xtok", "uld-xtok")
# Sequence-margin objectives (DPO, TVKD, PBSD) are run at a lower learning rate than the
# token-level ones, as is customary: at 1e-3 they push y_l's likelihood down without bound.
PREF_LR = 2e-4


def _dir_bytes(url: str) -> int:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return sum(fs.du(root, total=False).values()) if fs.exists(root) else 0




class Demo(Stages):
    """The embedded default: every stage of the product on a tiny sorting task, on CPU.

    Teacher: SFT on a corpus where 30% of answers are sorted, then DPO (+ length-normalised
    NLL on y_w, as in RPO) on its own clean pairs (sorted vs near miss); the SFT model is its
    reference. Student: a smaller model, SFT'd on the same corpus, then trained by each
    method with the same step budget on the students' noisier preference set (chosen is only
    the better of two answers) and the teacher's precomputed signals. Everything goes
    through stores, exactly as on a real cluster.
    """

    def __init__(self, out: Path, quick: bool, seed: int) -> None:
        from kdcache.train.tasks import make_demo_data
        from kdcache.train.tiny import build_tokenizer

        self.k, self.betas = 16, [1.0, 2.0]
        super().__init__(
            out, seed,
            precompute={"k": self.k, "betas": self.betas, "progress": False, "codec": "compact",
                        "max_length": 64},
            rollout={"max_new_tokens": 12, "progress": False, "batch_prompts": 64},
            train={"progress": False, "batch_groups": 16, "lr": 1e-3},
        )
        self.quick = quick
        self.tok = build_tokenizer()
        n = (lambda full, small: small if quick else full)  # noqa: E731
        self.steps = {"teacher_sft": n(600, 120), "teacher_dpo": n(250, 40),
                      "student_sft": n(300, 60), "student": n(300, 30)}
        self.data = make_demo_data(out / "data", seed=seed, n_sft=n(4000, 800), n_pref=n(1500, 300),
                                   n_rollout_prompts=n(600, 120), n_eval=n(200, 60))

    def evaluate(self, model: str, eval_store: str, cross_tokenizer: bool = False) -> dict:
        from kdcache.train.eval import EvalConfig, evaluate

        # the split tokenizer spends up to two tokens per digit (" ", "7"): its answers get
        # twice the token budget, the same budget in characters
        return evaluate(EvalConfig(model=str(model), store=eval_store, reward="sort_rule",
                                   samples=4, max_new_tokens=24 if cross_tokenizer else 12,
                                   seed=self.seed, cross_tokenizer=cross_tokenizer))

    def split_student(self, sft_data: str) -> str:
        """The student with the split tokenizer, SFT'd on the corpus as `student-sft-init`."""
        from kdcache.train.tiny import build_split_tokenizer, save_tiny

        init = self.out / "models" / "student-split-init"
        if not (init / "config.json").is_file():  # a second process (another seed) reuses it
            save_tiny(init, build_split_tokenizer(), hidden=64, layers=2, heads=4, seed=self.seed + 1)
        store = self.precompute(data=sft_data, teacher=None, tokenizer=str(init))
        return self.train("student-split-sft-init", init, store, "sft", self.steps["student_sft"],
                          batch_groups=64, lr=3e-3)


def xtok_row(d: Demo, m: str, student: str, pref: str, steps: int, name: str | None = None,
             **kw) -> str:
    """One cross-tokenizer row: SFT on chosen, or DCKD's Eq. 7 (α 0.2) with the KD term on
    the vocabulary map (tail mode) or ULD, at aligned positions. `name`: the run's name."""
    if m == "sft-xtok":
        return d.train(name or m, student, pref, "sft", steps, cross_tokenizer="map", **kw)
    mode = {"kd-xtok": "map", "uld-xtok": "uld"}[m]
    return d.train(name or m, student, pref, "dckd", steps, dckd_alpha=0.2, kd_mode="tail",
                   cross_tokenizer=mode, **kw)


def run_demo(out: Path, quick: bool = False, methods: list[str] | None = None, seed: int = 0) -> dict:
    import time

    from kdcache.train.tiny import save_tiny

    unknown = sorted(set(methods or []) - set(DEMO_METHODS))
    if unknown:
        raise ValueError(f"unknown demo methods {unknown}: choose from {', '.join(DEMO_METHODS)}")
    methods = list(methods or DEMO_METHODS)
    # the demo's models are tiny: one intra-op thread beats two that spend their time
    # synchronising (6x faster measured on a busy 2-core machine)
    import torch

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    d = Demo(out, quick, seed)
    announce(f"kdcache demo -> {out}  ({'quick' if quick else 'full'} run)")

    announce("[1/5] teacher: SFT from scratch, then DPO (reference = the SFT model)")
    t_init = save_tiny(out / "models" / "teacher-init", d.tok, hidden=128, layers=4, heads=4, seed=seed)
    sft_store = d.precompute(data=str(d.data["sft"]), teacher=None, tokenizer=str(t_init))
    ref = d.train("teacher-sft", t_init, sft_store, "sft", d.steps["teacher_sft"], batch_groups=64, lr=3e-3)
    dpo_store = d.precompute(data=str(d.data["teacher_pref"]), teacher=ref, reference=ref)
    teacher = d.train("teacher-dpo", ref, dpo_store, "dpo", d.steps["teacher_dpo"], batch_groups=32,
                      lr=5e-4, dpo_beta=0.1, dpo_nll=1.0)

    if TWO_TEACHERS & set(methods):  # the same recipe from another seed
        s2 = seed + TEACHER2_SEED
        t2_init = save_tiny(out / "models" / "teacher2-init", d.tok, hidden=128, layers=4, heads=4, seed=s2)
        ref2 = d.train("teacher2-sft", t2_init, sft_store, "sft", d.steps["teacher_sft"], batch_groups=64, lr=3e-3,
                       seed=s2)
        dpo_store2 = d.precompute(data=str(d.data["teacher_pref"]), teacher=ref2, reference=ref2)
        teacher2 = d.train("teacher2-dpo", ref2, dpo_store2, "dpo", d.steps["teacher_dpo"], batch_groups=32,
                           lr=5e-4, dpo_beta=0.1, dpo_nll=1.0, seed=s2)

    announce("[2/5] student: SFT on the same corpus (every method starts here)")
    s_init = save_tiny(out / "models" / "student-init", d.tok, hidden=64, layers=2, heads=4, seed=seed + 1)
    student0 = d.train("student-sft-init", s_init, sft_store, "sft", d.steps["student_sft"], batch_groups=64, lr=3e-3)

    announce("[3/5] precompute the teacher's signals once (top-K, reference, soft values)")
    pref = d.precompute(data=str(d.data["pref"]), teacher=teacher, reference=ref)
    evals = d.precompute(data=str(d.data["eval"]), teacher=teacher, reference=ref)
    if TWO_TEACHERS & set(methods):  # the second teacher scores the same pairs
        pref2 = d.precompute(data=str(d.data["pref"]), teacher=teacher2, reference=ref2)

    announce(f"[4/5] distil students: {', '.join(methods)}")
    steps = d.steps["student"]
    stores: dict[str, list[str]] = {}
    models: dict[str, str] = {}

    prompts = str(d.data["prompts"])
    split0 = d.split_student(str(d.data["sft"])) if set(methods) & set(XTOK_METHODS) else None
    for m in methods:
        if m == "sft":
            stores[m], models[m] = [pref], d.train(m, student0, pref, "sft", steps)
        elif m == "seqkd":
            roll = d.rollout(model=teacher, data=prompts, n=2, role="teacher_rollout")
            stores[m], models[m] = [roll], d.train(m, student0, roll, "seqkd", steps)
        elif m == "kd":  # top-K KD from the DPO teacher
            stores[m], models[m] = [pref], d.train(m, student0, pref, "kd", steps)
        elif m == "kd-teacher2":  # the same from the second teacher alone
            stores[m], models[m] = [pref2], d.train(m, student0, pref2, "kd", steps)
        elif m == "kd-2teachers":  # both teachers' signals, equal weights (METHODS §4)
            stores[m], models[m] = [pref, pref2], d.train(m, student0, [pref, pref2], "kd", steps, ensemble=True)
        elif m == "dckd":
            stores[m], models[m] = [pref], d.train(m, student0, pref, "dckd", steps, dckd_alpha=0.2)
        elif m == "dckd-code":  # the released-code variant: (K+1)-bucket KL, clamps, token means
            stores[m], models[m] = [pref], d.train(m, student0, pref, "dckd", steps, dckd_released_code=True)
        elif m == "adpa":
            models[m], stores[m] = adpa_from(d, student0, teacher, ref, prompts, steps, 2)
        elif m == "adpa-code":  # the released-code variant: clamps, token means, weight 1.6
            models[m], stores[m] = adpa_from(d, student0, teacher, ref, prompts, steps, 2,
                                             {"adpa_released_code": True}, name=m)
        elif m == "adpa+":
            models[m], stores[m] = adpa_plus(d, student0, teacher, ref, str(d.data["pref"]), prompts,
                                             steps, steps, 2, {"dckd_alpha": 0.2})
            stores[m].insert(0, pref)
        elif m.startswith("tvkd"):  # γ = 1 (the paper), γ = 0.7 (discounted), α = 0 (no shaping)
            shaping = {"tvkd": {}, "tvkd-g0.7": {"tvkd_gamma": 0.7}, "tvkd-a0": {"tvkd_alpha": 0.0}}[m]
            stores[m], models[m] = [pref], d.train(m, student0, pref, "tvkd", steps, lr=PREF_LR,
                                                   **{"tvkd_beta": 2.0, "tvkd_alpha": 0.7, **shaping})
        elif m == "dpo":
            own = d.precompute(data=str(d.data["pref"]), teacher=student0, reference=student0)
            stores[m], models[m] = [own], d.train(m, student0, own, "dpo", steps, dpo_beta=0.1, lr=PREF_LR)
        elif m == "tgpo":
            models[m], stores[m] = tgpo_rounds(d, student0, teacher, prompts, "sort_rule", steps, 1, 4)
        elif m == "pbsd":
            models[m], stores[m] = pbsd(d, student0, prompts, steps, 1, {"pbsd_beta": 0.1, "lr": PREF_LR})
        elif m in XTOK_METHODS:
            stores[m], models[m] = [pref], xtok_row(d, m, split0, pref, steps)

    announce("[5/5] evaluate on held-out pairs (rule-judged preference rate on samples)")
    # `run`: the runs/ directory of a row, so `kdcache plot runs/* results.json` joins them
    rows = [{"method": "teacher (DPO)", "run": "teacher-dpo", **d.evaluate(teacher, evals),
             "train_s": d.timings["teacher-dpo"], "store_mb": None},
            {"method": "student init (SFT corpus)", "run": "student-sft-init", **d.evaluate(student0, evals),
             "train_s": None, "store_mb": None}]
    if TWO_TEACHERS & set(methods):
        rows.insert(1, {"method": "teacher 2 (DPO, another seed)", "run": "teacher2-dpo", **d.evaluate(teacher2, evals),
                        "train_s": d.timings["teacher2-dpo"], "store_mb": None})
    if split0 is not None:
        rows.append({"method": "student init (split tokenizer)", "run": "student-split-sft-init",
                     **d.evaluate(split0, evals, True), "train_s": None, "store_mb": None})
    for m in methods:
        # ADPA+ is a pipeline: its cost includes the DCKD stage it starts from
        train_s = d.timings[m] + (d.timings["dckd"] if m == "adpa+" else 0.0)
        rows.append({"method": m, "run": Path(models[m]).parent.name, **d.evaluate(models[m], evals, m in XTOK_METHODS),
                     "train_s": train_s,
                     "store_mb": sum(_dir_bytes(u) for u in stores.get(m, [])) / 2**20})
    result = {"rows": rows, "seconds": time.perf_counter() - t_all, "quick": quick, "seed": seed,
              "steps": d.steps}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    announce(f"total {result['seconds']:.0f}s; results in {out / 'results.json'}; "
             f"`kdcache plot {out}/runs/* {out}/results.json --table` draws them")
    if quick:
        announce("--quick is a smoke test of every stage (a fifth of the data, 30 steps per student instead of "
                 "300): its numbers are not the README's table, which comes from the full run (no --quick)")
    return result


def demo_table(rows: list[dict]) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="kdcache demo: sort digits ascending (rule-judged)")
    eos = next((r["eos_token"] for r in rows if r.get("eos_token")), "EOS")  # the tokenizer's own
    for col in ("method", "pref rate", f"ends {eos}", "reward acc", "KL top-K", "train s", "store MB"):
        t.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        t.add_row(r["method"], fmt(r.get("reward_mean"), ".3f"), fmt(r.get("eos_rate"), ".3f"),
                  fmt(r.get("reward_accuracy"), ".3f"),
                  fmt(r.get("kl_topk"), ".3f"), fmt(r.get("train_s"), ".1f"), fmt(r.get("store_mb"), ".2f"))
    console = Console(record=True, width=100)
    with console.capture() as cap:
        console.print(t)
    return cap.get()
