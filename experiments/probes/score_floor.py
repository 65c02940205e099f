"""What bounds the GPU selection-score pass (`nsa_selection_scores`): the same launch with parts
taken out, and with its exponentials on the FMA units.

    python -m experiments.probes.score_floor [--seq_len 65536] [--out out/score_floor.json]
        [--variants kernel,mma,...]

B=1, Hq=64, Hkv=4 (G = 16), D=128, bf16, paper config, random inputs (as `bench_kernels`'
`scores` row: `selection_scores_from_lse` on Triton from the compressed branch's log-sum-exp).
Each row swaps the body of `pallas_kernels.gpu.compressed_attention._scores_kernel` and times the
same `pallas_call` (grid, block specs, launch settings). A variant keeps its loop's values live by
an elementwise float32 carry whose head sums it stores once at the end:

- `kernel`: the shipped pass (`q . k_cmp`, `exp2(s - lse)`, head sums, block sums and tail
  sums, their stores: `TAILS_APART`);
- `mma`: the scores `s` alone (the loads and the tensor-core dots, and the causal mask);
- `exp`: `s` and `exp2(s - lse)` (`jnp.exp2`: one MUFU `ex2` a score);
- `exp_poly`: `s` and `exp2` as a degree-6 polynomial on the FMA units (`exp2_poly`);
- `exp_alternating`: `exp2` on MUFU in even key tiles, the polynomial in odd ones;
- `group`: `exp`, then the sum over each position's heads (`_group_sum`) every tile;
- `block_sums`: `group`, then each selection block's plain sum (a reshape of the keys);
- `block_tails`: `group`, then each selection block's plain sum and tail sum (the scores but
  the one-block shift);
- `block_scores`: `group`, then the blocks' scores (`_block_sum_scores`: sums, tail sums, the
  shift by one block), all but the stores;
- `kernel_poly`: the shipped pass with `exp2_poly` for `jnp.exp2`: same scores to ~1e-6;
- `kernel_alternating`: the shipped pass with `exp_alternating`'s exponentials;
- `kernel_blocks_first`: the shipped pass with the blocks' sums taken per row, before the head
  sums (`_BlocksFirstWriter`);
- `kernel_shifted`: the pass shifting the tail sums by one block (a `[P, owned, owned]`
  product) instead of storing them apart (`TAILS_APART` off; the shipped pass's second array
  and the top-n kernel's read of it are not in this probe's time);
- `kernel_folded`, `kernel_shifted_folded`: `kernel` and `kernel_shifted` reading cuDNN's
  folded q and log-sum-exp in place (`folded_score_parts`, `FOLDED_SCORES`; the folded inputs
  made by `cudnn_compressed.compressed_attention_folded`): whether the pass itself or the
  program around it makes the folded reads slower beside the shifted tails (2026-12-07).

Every variant but `kernel` and `kernel_folded` runs with `TAILS_APART` off: they take the
shifting pass apart.

The time of a step that is only `mma` is the pass's MMA and load floor; `exp` minus `mma` what
the exponentials add where they do not overlap the dots; `group` minus `exp` the head sums;
`block_sums`, `block_tails`, `block_scores` and `kernel` add the blocks' sums, their tails, the
shift, the stores.
Prints a table (ms, TF/s of `Q K_cmp^T`), writes JSON.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

import nsa_jax
from experiments import kernel_settings
from experiments.bench_kernels import D, HKV, HQ, median_ms, random_qkv
from experiments.probes import floor_cli
from nsa_jax import cudnn_compressed
from pallas_kernels.gpu import compressed_attention as cmp_kernel
from pallas_kernels.gpu.tile_math import masked_split_loop

# 2^f = e^(f ln 2) on f in [-1/2, 1/2]: Taylor terms (ln 2)^i / i!, i = 0..6; the first term
# left out is (ln 2 / 2)^7 / 7! ~ 1.2e-7 of the value, about float32's epsilon.
_EXP2_TERMS = tuple(float(np.log(2.0) ** i / np.prod(np.arange(1, i + 1))) for i in range(7))


# Adding 1.5 * 2^23 rounds a float32 of magnitude < 2^22 to an integer held in the sum's low
# mantissa bits: no conversion instructions (16 a clock an SM on Hopper, MUFU's rate, against 128
# FMAs).
_ROUNDER = 1.5 * 2.0 ** 23
_ROUNDER_BITS = 0x4B400000  # its float32 bits


def exp2_poly(x):
  """`2^x` for float32 `x <= ~0` on the FMA units (no MUFU `ex2`): `2^n * p(x - n)`, `n` the
  nearest integer, `2^n` built in the exponent bits; 0 at and below -127 (-inf included)."""
  # The clamp of the sum also keeps XLA from folding `(x + c) - c` into `x`.
  shifted = jnp.maximum(x + _ROUNDER, _ROUNDER - 127.0)
  f = jnp.maximum(x, -127.0) - (shifted - _ROUNDER)
  p = jnp.full_like(f, _EXP2_TERMS[-1])
  for term in reversed(_EXP2_TERMS[:-1]):
    p = p * f + term
  n_plus_bias = jax.lax.bitcast_convert_type(shifted, jnp.int32) - (_ROUNDER_BITS - 127)
  return p * jax.lax.bitcast_convert_type(jax.lax.shift_left(n_plus_bias, 23), jnp.float32)


def _loop_kernel(q_ref, k_ref, lse_ref, score_ref, *, lay, scale, slc_block, slc_cols,
                 slc_spill, step, grouped=False, width=None):
  """The loop over the key tiles with `step(s, lse, kt)` (`[R, keys]`, or `[P, width]` where
  `grouped`; `width` defaults to the keys) as its work, summed elementwise into the carry; the
  carry's head sums are stored once, in the first columns."""
  del slc_block, slc_cols, slc_spill
  tile = pl.program_id(0)
  q, lse = q_ref[...], lse_ref[...]
  row_pos = cmp_kernel._row_positions(tile, lay)
  keys = cmp_kernel.SCORE_KEYS

  def body(kt, acc, masked):
    s, _ = cmp_kernel._scores(q, k_ref[pl.ds(kt * keys, keys), :], kt * keys, row_pos, lay,
                              scale, masked)
    return acc + step(s, lse, kt)

  acc = masked_split_loop(cmp_kernel._full_tile_count(tile, lay, keys),
                          cmp_kernel._tile_count(tile, lay, keys), body,
                          jnp.zeros((lay.positions, width or keys) if grouped
                                    else (lay.rows, keys), jnp.float32))
  cmp_kernel._store_scores(score_ref, acc if grouped else cmp_kernel._group_sum(acc, lay), tile,
                           0, acc.shape[1], lay)


def _step_kernel(step):
  return lambda *refs, **kw: _loop_kernel(*refs, step=step, **kw)


def _group_step(s, lse, lay):
  return cmp_kernel._group_sum(jnp.exp2(s - lse[:, None]), lay)


def _block_sums_step(s, lse, lay, slc_block, part):
  """`group`, then each selection block's plain sum (`part` "sums"), with its tail sum
  ("tails": `c V_j - U_j`) or its score ("scores": the tails shifted by one block too)."""
  p_grp = _group_step(s, lse, lay)
  if part == "tails":
    return cmp_kernel._block_sum_parts(p_grp, lay, slc_block)[0]
  if part == "scores":
    scores, last = cmp_kernel._block_sum_scores(p_grp, jnp.zeros(p_grp.shape[:1], jnp.float32),
                                                lay, slc_block)
    return scores + last[:, None]
  return jnp.sum(p_grp.reshape(p_grp.shape[0], -1, slc_block // lay.stride), axis=2)


def _grouped_kernel(step, blocks=False):
  """`_loop_kernel` over `[P, keys]` (`blocks`: `[P, owned]`) steps `step(s, lse, lay, l')`."""
  def kernel(*refs, lay, slc_block, **kw):
    width = cmp_kernel.SCORE_KEYS * lay.stride // slc_block if blocks else None
    return _loop_kernel(*refs, lay=lay, slc_block=slc_block, grouped=True, width=width,
                        step=lambda s, lse, kt: step(s, lse, lay, slc_block), **kw)
  return kernel


def alternating_exp2(x, kt):
  """`exp2(x)` on MUFU in even key tiles `kt`, on the FMA units in odd ones."""
  return jax.lax.cond(jax.lax.rem(kt, 2) == 0, jnp.exp2, exp2_poly, x)


class _BlocksFirstWriter(cmp_kernel._ScoreWriter):
  """The shipped scores with the blocks' sums and tails taken per row, before the head sums
  (which then reduce `[R, owned]` twice instead of `[R, keys]` once)."""

  def update(self, kt, p, spill):
    lay = self.lay
    if not self.block_sums or lay.block == lay.stride:
      return super().update(kt, p, spill)
    own, tails = cmp_kernel._block_sum_parts(p, lay, self.slc_block)  # per row
    own = cmp_kernel._group_sum(own, lay)
    previous, spill = cmp_kernel._shift_one_block(cmp_kernel._group_sum(tails, lay), spill)
    cmp_kernel._store_scores(self.score_ref, own + previous, self.tile, kt * self.owned,
                             self.owned, lay)
    return spill


VARIANTS = {  # name -> the kernel body (None: the shipped one)
    "kernel": None,
    "mma": _step_kernel(lambda s, lse, kt: s),
    "exp": _step_kernel(lambda s, lse, kt: jnp.exp2(s - lse[:, None])),
    "exp_poly": _step_kernel(lambda s, lse, kt: exp2_poly(s - lse[:, None])),
    "exp_alternating": _step_kernel(lambda s, lse, kt: alternating_exp2(s - lse[:, None], kt)),
    "group": _grouped_kernel(lambda s, lse, lay, slc_block: _group_step(s, lse, lay)),
    "block_sums": _grouped_kernel(functools.partial(_block_sums_step, part="sums"), blocks=True),
    "block_tails": _grouped_kernel(functools.partial(_block_sums_step, part="tails"),
                                   blocks=True),
    "block_scores": _grouped_kernel(functools.partial(_block_sums_step, part="scores"),
                                    blocks=True),
    "kernel_poly": functools.partial(cmp_kernel._scores_kernel,
                                     exp2=lambda x, kt: exp2_poly(x)),
    "kernel_alternating": functools.partial(cmp_kernel._scores_kernel, exp2=alternating_exp2),
    "kernel_blocks_first": functools.partial(cmp_kernel._scores_kernel,
                                             writer=_BlocksFirstWriter),
    "kernel_shifted": None,
    "kernel_folded": None,
    "kernel_shifted_folded": None,
}
SAME_OUTPUT = ("kernel_poly", "kernel_alternating", "kernel_blocks_first", "kernel_shifted",
               "kernel_folded", "kernel_shifted_folded")
TAILS_APART_VARIANTS = ("kernel", "kernel_folded")


@contextlib.contextmanager
def variant_installed(name):
  """Inside: the score pass on Triton with the variant's kernel body (`kernel_settings.applied`
  clears the jit caches on the way in and out, so calls trace it afresh)."""
  body, shipped = VARIANTS[name], cmp_kernel._scores_kernel
  tails_apart = int(name in TAILS_APART_VARIANTS)
  with kernel_settings.applied(f"compressed.SCORES=triton,compressed.TAILS_APART={tails_apart}"):
    try:
      if body is not None:
        cmp_kernel._scores_kernel = body
      yield
    finally:
      cmp_kernel._scores_kernel = shipped


def is_folded(name) -> bool:
  """Whether the variant reads cuDNN's folded q and log-sum-exp (`folded_score_parts`)."""
  return name.endswith("_folded")


def score_pass(config, interpret=False, seq_len=None):
  """`(q, k_cmp, lse) -> (scores, tails)`: `selection_score_parts` (the pass alone, its tail
  sums apart where `TAILS_APART`) with the config's settings; given `seq_len`, the same from the
  folded `(qf, k_cmp, lse)` (`folded_score_parts`)."""
  kwargs = dict(block=config.cmp_block, stride=config.cmp_stride, slc_block=config.slc_block,
                scale=D ** -0.5, interpret=interpret)
  if seq_len is not None:
    return lambda qf, k_cmp, lse: cmp_kernel.folded_score_parts(qf, k_cmp, lse, seq_len=seq_len,
                                                                **kwargs)
  return lambda q, k_cmp, lse: cmp_kernel.selection_score_parts(q, k_cmp, lse, **kwargs)


def run_variant(name, inputs, config, repeats, interpret=False):
  """`(ms, scores [B, Hkv, T, width])` of the score pass with the variant's kernel body on
  `inputs[is_folded(name)]` (the scores summed with their tails where they come apart, outside
  the timing)."""
  args = inputs[is_folded(name)]
  seq_len = inputs[False][0].shape[1]
  fn = jax.jit(score_pass(config, interpret, seq_len if is_folded(name) else None))
  with variant_installed(name):
    scores, tails = fn(*args)
    ms = median_ms(fn, args, repeats) if repeats else float("nan")
  return ms, (scores if tails is None else scores + tails)[:, :, :seq_len]


def main(argv=None):
  args = floor_cli.parse_args(argv, VARIANTS)
  t, config = args.seq_len, nsa_jax.NSAConfig()
  q, k, v = random_qkv(t, HKV)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=config.cmp_block, stride=config.cmp_stride)
  # The compressed branch as the GPU runs it (cuDNN over folded queries; XLA in its place on
  # the CPU), its log-sum-exp unfolded and folded: the same numbers both ways.
  fold = dict(block=config.cmp_block, stride=config.cmp_stride, use_cudnn=not args.interpret)
  lse = cudnn_compressed.compressed_attention(q, k_cmp, v_cmp, D ** -0.5, **fold)[1]
  _, qf, lse_folded = cudnn_compressed.compressed_attention_folded(q, k_cmp, v_cmp, D ** -0.5,
                                                                   **fold)
  inputs = {False: (q, k_cmp, lse), True: (qf, k_cmp, lse_folded)}
  num_cmp = config.num_cmp_blocks(t)
  flops = 2.0 * HQ * t * (num_cmp / 2) * D  # Q K_cmp^T over the visible half, causally
  rows, reference = [], None
  for name in args.variants.split(","):
    try:
      ms, out = run_variant(name, inputs, config, 0 if args.interpret else args.repeats,
                            args.interpret)
    except Exception as error:  # pylint: disable=broad-except
      # A variant the backend's compiler refuses (Triton, on the device) is a row of the table.
      rows.append(dict(variant=name, error=f"{type(error).__name__}: {error}"[:500]))
      print(f"{name:>15} failed: {rows[-1]['error'][:200]}", flush=True)
      continue
    row = dict(variant=name, ms=ms, tflops=flops / ms / 1e9)
    if name == "kernel":
      reference = out
    if name in SAME_OUTPUT and reference is not None:
      # Defined where the top-n reads: row t, blocks j <= t // l'.
      blocks = jnp.arange(out.shape[3])[None, :] <= jnp.arange(out.shape[2])[:, None] // (
          config.slc_block)
      gap = jnp.where(blocks, jnp.abs(out - reference), 0.0)
      row["max_rel_diff"] = float(jnp.max(gap) / jnp.max(jnp.where(blocks, reference, 0.0)))
    rows.append(row)
    diff = f"  max rel diff {row['max_rel_diff']:.1e}" if "max_rel_diff" in row else ""
    print(f"{name:>15} {ms:8.2f} ms {row['tflops']:6.1f} TF/s{diff}", flush=True)
  return floor_cli.record(args.out, seq_len=t, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                          rows=rows)


if __name__ == "__main__":
  main()
