"""Per-field Zarr codec pipelines: a lossless mode and a bounded-error compact mode.

Why these codecs: everything used here is a well-kept, registered codec (zarr's own
`bytes`/`blosc`, numcodecs' `fixedscaleoffset`/`delta`), and the full pipeline is written
into each array's `zarr.json`, so a reader (ours or plain zarr) decodes without guesswork.

* lossless: float32/int32 bytes → blosc(zstd, shuffle).  Bit-exact round trip of the
  float32 values.
* compact (error_bound ε, default 2e-3 nats): real-valued fields are snapped, in float64,
  to a grid of step `2·(ε − spacing32(MAX_ABS))` and stored as int32 grid indices
  (`fixedscaleoffset`); rows that are descending along K (`topk_logprobs`, and the
  nearly-descending `ref_topk_logprobs`) are then delta-coded (`delta`) so most stored
  numbers are small; blosc(zstd, bitshuffle) squeezes out the constant high bits.
  Guarantee: |decoded − original| ≤ ε for every value with |x| ≤ MAX_ABS (the writer refuses
  larger or non-finite values in compact mode).  Ids are always exact.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .format import TOKEN_FIELDS

__all__ = ["CodecSpec", "resolve_codec", "MAX_ABS", "DEFAULT_ERROR_BOUND", "MIN_ERROR_BOUND"]

#: Largest |value| the compact mode accepts (nats).  Teacher log-probs of top-K tokens and
#: soft values of real LMs are far inside this; anything beyond is masked logits or a bug.
MAX_ABS = 256.0
DEFAULT_ERROR_BOUND = 2e-3
_SPACING = float(np.spacing(np.float32(MAX_ABS)))  # float32 ulp at MAX_ABS
MIN_ERROR_BOUND = 1e-4
DEFAULT_CODEC = "compact"


# Module-wide as well: catch_warnings is not thread-safe and shards decode in threads.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")


@contextlib.contextmanager
def quiet_numcodecs() -> Iterator[None]:
    """Silence zarr's "numcodecs codecs are not in the v3 spec" warning.

    We use them knowingly: they are registered zarr codecs and declared in zarr.json.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
        yield


@dataclass(frozen=True)
class CodecSpec:
    """Resolved codec choice of a store (recorded in the manifest's `fields`)."""

    mode: str  # "lossless" | "compact"
    error_bound: float  # 0.0 for lossless
    clevel: int = 5

    @property
    def step(self) -> float:
        """Quantisation grid step; |x − snap(x)| ≤ step/2 and float32 rounding adds ≤ ulp/2."""
        return 2.0 * (self.error_bound - _SPACING)

    def quantises(self, name: str) -> bool:
        return self.mode == "compact" and TOKEN_FIELDS[name].kind != "ids"

    def snap(self, x: np.ndarray) -> np.ndarray:
        """Round real values onto the grid in float64 and return float32.

        Done here rather than inside the zarr codec because the codec multiplies in float32,
        which near |x| = MAX_ABS can move a value by a few hundredths of a step; snapping in
        float64 first makes the codec's rounding exact and keeps the bound a guarantee.
        """
        scale = 1.0 / self.step
        return (np.rint(np.asarray(x, dtype=np.float64) * scale) / scale).astype(np.float32)

    def zarr_codecs(self, name: str) -> dict[str, Any]:
        """`filters`/`compressors` kwargs for `zarr.Group.create_array` for field `name`."""
        from zarr.codecs import BloscCodec
        from zarr.codecs import numcodecs as znc

        f = TOKEN_FIELDS[name]
        if not self.quantises(name):
            shuffle = "shuffle" if f.kind == "ids" or self.mode == "lossless" else "bitshuffle"
            return {
                "filters": [],
                "compressors": [BloscCodec(cname="zstd", clevel=self.clevel, shuffle=shuffle)],
            }
        with quiet_numcodecs():
            filters: list[Any] = [
                znc.FixedScaleOffset(offset=0, scale=1.0 / self.step, dtype="<f4", astype="<i4")
            ]
            if f.trailing == "k":
                # Along K the values of one row are (nearly) sorted: consecutive differences
                # are small.  Delta runs over the flattened chunk, i.e. along K with one jump
                # per row, which is what we want.
                filters.append(znc.Delta(dtype="<i4"))
        return {
            "filters": filters,
            "compressors": [BloscCodec(cname="zstd", clevel=self.clevel, shuffle="bitshuffle")],
        }

    def describe(self, name: str) -> dict[str, Any]:
        """Human/manifest description of the pipeline for `name` (zarr.json is authoritative)."""
        d: dict[str, Any] = {"mode": self.mode}
        if self.quantises(name):
            d.update(error_bound=self.error_bound, step=self.step, max_abs=MAX_ABS)
            d["pipeline"] = ["fixedscaleoffset(<f4→<i4)"] + (
                ["delta(<i4)"] if TOKEN_FIELDS[name].trailing == "k" else []
            ) + ["bytes", "blosc(zstd, bitshuffle)"]
        else:
            d["pipeline"] = ["bytes", "blosc(zstd, shuffle)"]
        return d


def resolve_codec(options: dict[str, Any]) -> CodecSpec:
    """Read `codec` / `error_bound` from StoreMeta.options (default: compact, 2e-3 nats)."""
    mode = options.get("codec", DEFAULT_CODEC)
    if mode == "lossless":
        if "error_bound" in options and options["error_bound"] not in (0, 0.0, None):
            raise ValueError(
                "options has codec='lossless' and a non-zero error_bound; drop error_bound or "
                "use codec='compact'"
            )
        return CodecSpec("lossless", 0.0)
    if mode == "compact":
        eps = float(options.get("error_bound", DEFAULT_ERROR_BOUND))
        if not math.isfinite(eps) or eps < MIN_ERROR_BOUND:
            raise ValueError(
                f"options.error_bound={eps} is below the supported minimum {MIN_ERROR_BOUND} "
                f"nats for codec='compact'; use a larger bound or codec='lossless'"
            )
        return CodecSpec("compact", eps)
    raise ValueError(f"options.codec={mode!r} is not a codec; use 'compact' or 'lossless'")
