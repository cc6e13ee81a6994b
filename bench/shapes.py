"""The benchmark shape sets: a tiny smoke set, the 2-core CPU quick set and the GPU (bfloat16) set.

A token shape is `N` tokens of hidden size `D` against a `V`-row LM head (id `N…`). Pairwise shapes are `P` pairs
of sequences of `T` tokens (`2·P·T` tokens, id `P…xT…`), GRPO shapes `B` completions of `T` tokens (`B·T` tokens,
id `B…xT…`).
"""

from __future__ import annotations

from dataclasses import dataclass

SETS = ("smoke", "cpu", "cpu-full", "gpu")


@dataclass(frozen=True)
class Shape:
    """One benchmark shape. `rows × seq_len` tokens (`rows = 1, seq_len = N` for flat token workloads)."""

    tokens: int
    d: int
    v: int
    dtype: str
    rows: int = 1
    seq_len: int = 0
    pairs: int = 0

    def __post_init__(self):
        if self.seq_len and self.rows * self.seq_len != self.tokens:
            raise ValueError(f"rows*seq_len must equal tokens, got {self.rows}*{self.seq_len} != {self.tokens}")

    @property
    def id(self) -> str:
        if self.pairs:
            lead = f"P{self.pairs}xT{self.seq_len}"
        elif self.seq_len:
            lead = f"B{self.rows}xT{self.seq_len}"
        else:
            lead = f"N{self.tokens}"
        return f"{lead}-D{self.d}-V{self.v}-{self.dtype}"


def token_shape(n: int, d: int, v: int, dtype: str) -> Shape:
    return Shape(tokens=n, d=d, v=v, dtype=dtype)


def pair_shape(pairs: int, t: int, d: int, v: int, dtype: str) -> Shape:
    """`pairs` chosen/rejected pairs of `t` tokens: the batch is `[2·pairs, t]`."""
    return Shape(tokens=2 * pairs * t, d=d, v=v, dtype=dtype, rows=2 * pairs, seq_len=t, pairs=pairs)


def seq_shape(seqs: int, t: int, d: int, v: int, dtype: str) -> Shape:
    """`seqs` completions of `t` tokens: the batch is `[seqs, t]`."""
    return Shape(tokens=seqs * t, d=d, v=v, dtype=dtype, rows=seqs, seq_len=t)


def shape_set(name: str, device_type: str) -> dict[str, list[Shape]]:
    """Shapes per workload family ("token", "pair", "grpo") for a named set on a device type."""
    if name == "smoke":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
        # Odd sizes on purpose: no provider gets a lucky power-of-two tile. The first token and GRPO shapes are small
        # enough for the Triton interpreter: the GPU check's CPU rehearsal (bench/gpu_check.sh) runs those.
        return {
            "token": [
                token_shape(40, 16, 157, dtype),
                token_shape(300, 64, 1000, dtype),
                token_shape(600, 64, 3000, dtype),
            ],
            "pair": [pair_shape(1, 150, 64, 1000, dtype)],
            "grpo": [seq_shape(2, 20, 16, 157, dtype), seq_shape(2, 150, 64, 1000, dtype)],
        }
    if name in ("cpu", "cpu-full"):
        # "cpu" fits 10 minutes on 2 cores: token log-probs on an L of the grid (tokens at V = 32000, vocab at
        # N = 2048), the losses at 2,048 tokens (GRPO at the "Must show" shape). "cpu-full" is the whole grid.
        grid = [(n, v) for v in (32000, 151936) for n in (1024, 2048)]
        if name == "cpu":
            grid = [(1024, 32000), (2048, 32000), (2048, 151936)]
        vocabs = (32000, 151936) if name == "cpu-full" else None
        return {
            "token": [token_shape(n, 1024, v, "float32") for n, v in grid],
            "pair": [pair_shape(1, 1024, 1024, v, "float32") for v in (vocabs or (32000,))],
            "grpo": [seq_shape(4, 512, 1024, v, "float32") for v in (vocabs or (151936,))],
        }
    if name == "gpu":
        bf = "bfloat16"
        token = [
            token_shape(8192, 4096, 128256, bf),  # the "Must show" shape first: it runs even if time runs out
            token_shape(4096, 4096, 128256, bf),
            token_shape(16384, 4096, 128256, bf),
            token_shape(8192, 3584, 152064, bf),  # Qwen2.5-7B
            token_shape(8192, 2304, 256000, bf),  # Gemma-2-2B
        ]
        return {
            "token": token,
            "pair": [pair_shape(b, 1024, 4096, 128256, bf) for b in (4, 2, 8, 16)],
            "grpo": [seq_shape(8, 1024, 4096, 128256, bf), seq_shape(16, 1024, 4096, 128256, bf)],
        }
    raise ValueError(f"bench set must be one of {SETS}, got {name!r}")
