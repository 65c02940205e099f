"""What a model's attention does at the positions that must retrieve.

Training logs these at every evaluation of a retrieval task (`metrics.jsonl`, per layer):
`induction_attention` / `previous_token_attention` for every attention kind (the two halves of
the induction circuit that copies an answer, in the window's or the dense layer's attention),
and for NSA and its ablations `gates_at_answers` (the mean compressed / selected / window gate),
`compressed_target_attention` and, with the selected branch, `selection_hits` and
`selected_induction_attention`. `experiments.plot` writes them for a finished run. When a run
does not retrieve they tell the cases apart: a selection that never holds the answer's block
(the ranking did not learn), one that holds it while the selected gate is closed, a compressed
gate that closed and so stopped training the ranking (the selection's scores are the compressed
branch's attention, whose only gradient comes through that gate), a selection that holds the
block while the selected branch's attention does not read the answer in it, or token-level
attention that never formed the circuit (a plateau where the model knows which values the
context holds but not which key each belongs to).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nsa_jax
from experiments import tasks


def layer_internals(model, tokens):
  """Every layer's selection and gates on `tokens int [B, T]` (a `DecoderLM` of NSA layers,
  ablations included).

  Returns:
    `(indices int32 [L, B, T, Hkv, n]` or None for layers without the selected branch,
    `gates float32 [L, B, T, Hq, 3])`, the gates in `nsa_jax.nn.BRANCHES` order (all 1 for a
    model whose branches are summed, `gating="sum"`; a branch the layers lack has its gate
    computed but unused).
  """
  indices, gates = _layer_internals(model, jnp.asarray(tokens))
  return (None if indices is None else np.asarray(indices)), np.asarray(gates)


@nnx.jit
def _layer_internals(model, tokens):
  x = model.embed(tokens)
  selections, gates = [], []
  for block in model.blocks:
    layer = block.attention
    normed = block.attention_norm(x)
    q, keys, values = layer._project(normed)  # pylint: disable=protected-access
    if "slc" in layer.branches:
      k_cmp, _ = layer._compress(keys[0], values[0])  # pylint: disable=protected-access
      selections.append(nsa_jax.select_blocks(q, k_cmp, config=layer.config,
                                              implementation=layer.implementation))
    layer_gates = layer._gates(normed, jnp.float32)  # pylint: disable=protected-access
    gates.append(jnp.ones(q.shape[:3] + (3,)) if layer_gates is None else layer_gates)
    x = block(x)
  return (jnp.stack(selections) if selections else None), jnp.stack(gates)


def at_answers(model, tokens, queries, targets) -> dict:
  """The selection and gates at the positions that must retrieve.

  Args:
    model: an NSA `DecoderLM`.
    tokens: int `[B, T]` inputs.
    queries: int `[Q]` positions that predict an answer token.
    targets: int `[B, Q]` the position each of them must read (its selection block is the one
      the selection should hold).

  Returns:
    `{"gates_at_answers": [L][3] mean gate of each branch over the queries and heads,
    "selection_hits": [L] fraction of (query, KV head) pairs whose selection holds the target
    block (only for layers with the selected branch)}`, plain lists.
  """
  indices, gates = layer_internals(model, tokens)
  found = dict(gates_at_answers=gates[:, :, queries].mean(axis=(1, 2, 3)).tolist())
  if indices is not None:
    target_blocks = np.asarray(targets) // model.blocks[0].attention.config.slc_block
    at_queries = indices[:, :, queries]  # [L, B, Q, Hkv, n]
    hits = np.any(at_queries == target_blocks[None, :, :, None, None], axis=-1)
    found["selection_hits"] = hits.reshape(hits.shape[0], -1).mean(-1).tolist()
  return found


def token_attention(model, tokens, queries, targets) -> dict:
  """Whether each layer's token-level attention forms the induction circuit that copies an answer.

  Recall by attention takes two layers (Olsson et al., 2022): a previous-token head lets the
  token to copy (MQAR: the pair's value; passkey: a needle digit) carry the token before it,
  then an induction head at the answer-predicting position attends to that token. Per layer:
  `previous_token_attention`, the attention weight from each target to the position before it,
  and `induction_attention`, from each query to its target; each the largest over the query
  heads of its mean over sequences and answers (one head makes a circuit). A run stuck on a
  plateau shows which half never formed.

  The attention is the window branch's for NSA layers and their ablations (keys
  `t - w < u <= t`), the full causal attention's for dense layers. Layers with the selected
  branch also give `selected_induction_attention`: the query's weight on its target in the
  selected branch (0 where the selection misses the target's block), the branch that must
  read an answer farther back than the window; layers with the compressed branch give
  `compressed_target_attention`: the query's compressed attention on the blocks that hold its
  target (a learned summary can carry the answer itself: RESULTS.md's passkey at T = 128).

  Args:
    model: a `DecoderLM`, any attention kind.
    tokens: int `[B, T]` inputs; queries: int `[Q]`; targets: int `[B, Q]`, each >= 1.

  Returns:
    `{"induction_attention": [L], "previous_token_attention": [L]}` (and
    `"selected_induction_attention"`, `"compressed_target_attention"`: [L]), plain lists.
  """
  found = _token_attention(model, jnp.asarray(tokens), jnp.asarray(queries),
                           jnp.asarray(targets))
  return {name: np.asarray(values).tolist() for name, values in found.items()}


@nnx.jit
def _token_attention(model, tokens, queries, targets):
  num_queries = queries.shape[0]
  rows = jnp.concatenate([jnp.broadcast_to(queries, targets.shape), targets], axis=1)
  found = {"induction_attention": [], "previous_token_attention": []}
  x = model.embed(tokens)
  for block in model.blocks:
    layer, normed = block.attention, block.attention_norm(x)
    probs = attention_rows(layer, normed, rows)  # [B, Hq, 2Q, T]
    found["induction_attention"].append(weight_on(probs[:, :, :num_queries], targets))
    found["previous_token_attention"].append(weight_on(probs[:, :, num_queries:], targets - 1))
    if "slc" in getattr(layer, "branches", ()):
      probs = attention_rows(layer, normed, rows[:, :num_queries], branch="slc")
      found.setdefault("selected_induction_attention", []).append(weight_on(probs, targets))
    if "cmp" in getattr(layer, "branches", ()):
      probs, holds = compressed_rows(layer, normed, rows[:, :num_queries], targets)
      found.setdefault("compressed_target_attention", []).append(
          jnp.sum(probs * holds[:, None], axis=-1).mean(axis=(0, 2)).max())
    x = block(x)
  return {name: jnp.stack(values) for name, values in found.items()}


def weight_on(probs, at):
  """The best head's mean weight on one key per row: `probs [B, Hq, Q, T]` (`attention_rows`)
  at key positions `at int [B, Q]`; a scalar."""
  return jnp.take_along_axis(probs, at[:, None, :, None], -1).mean(axis=(0, 2, 3)).max()


def attention_rows(layer, x, rows, branch: str = "swa"):
  """`[B, Hq, R, T]` float32: the attention weights of query positions `rows int [B, R]` of
  `layer`'s token-level attention on its input `x [B, T, F]` (after the block's norm): for NSA
  layers the window branch (`branch="swa"`) or the selected branch (`"slc"`: the blocks the
  layer's selection chose for the row's KV group), each on its own K/V set with
  `separate_kv`; full causal for dense layers."""
  q, keys, values = layer._project(x)  # pylint: disable=protected-access
  k = keys[{"swa": 2, "slc": 1}[branch] if len(keys) == 3 else 0]
  t = k.shape[1]
  keys_at, rows_at = jnp.arange(t), rows[:, None, :, None]
  visible = keys_at <= rows_at  # dense: every earlier key
  if isinstance(layer, nsa_jax.nn.NativeSparseAttention) and branch == "swa":
    visible &= keys_at > rows_at - layer.config.window
  elif isinstance(layer, nsa_jax.nn.NativeSparseAttention):
    visible &= _selected_keys(layer, q, keys[0], values[0], rows)
  return _row_weights(q, k, rows, visible)


def _row_weights(q, k, rows, visible):
  """`[B, Hq, R, S]` float32 softmax weights of the queries `q [B, T, Hq, Dk]` at `rows [B, R]`
  over keys `k [B, S, Hkv, Dk]` (query head h reads KV head h // G), where `visible` (broadcast
  to `[B, Hq, R, S]`) allows; a row that sees nothing gets weights 0."""
  q_rows = jnp.take_along_axis(q, rows[:, :, None, None], axis=1)  # [B, R, Hq, Dk]
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  scores = jnp.einsum("brhd,bshd->bhrs", q_rows, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(jnp.where(visible, scores * q.shape[-1] ** -0.5, -jnp.inf), axis=-1)
  return jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0)


def compressed_rows(layer, x, rows, targets):
  """The compressed branch at query positions `rows int [B, R]` of an NSA `layer` on its input
  `x [B, T, F]`: `(weights float32 [B, Hq, R, Tc]` over the compressed blocks, `holds bool
  [B, R, Tc]`: the blocks whose tokens include `targets int [B, R]`)."""
  cfg = layer.config
  q, keys, values = layer._project(x)  # pylint: disable=protected-access
  k_cmp, _ = layer._compress(keys[0], values[0])  # pylint: disable=protected-access
  first = jnp.arange(k_cmp.shape[1]) * cfg.cmp_stride  # each block's first token
  visible = first + cfg.cmp_block - 1 <= rows[:, None, :, None]  # [B, 1, R, Tc]
  holds = (first <= targets[..., None]) & (targets[..., None] < first + cfg.cmp_block)
  return _row_weights(q, k_cmp, rows, visible), holds


def _selected_keys(layer, q, k, v, rows):
  """`[B, Hq, R, T]` bool: the keys in the blocks that `layer`'s selection chose for `rows`."""
  cfg, t, group = layer.config, k.shape[1], q.shape[2] // k.shape[2]
  k_cmp, _ = layer._compress(k, v)  # pylint: disable=protected-access
  chosen = nsa_jax.select_blocks(q, k_cmp, config=cfg, implementation=layer.implementation)
  chosen = jnp.take_along_axis(chosen, rows[:, :, None, None], axis=1)  # [B, R, Hkv, n]
  blocks = jax.nn.one_hot(chosen, -(-t // cfg.slc_block), dtype=jnp.bool_).any(axis=-2)  # -1: none
  blocks = jnp.repeat(jnp.moveaxis(blocks, 2, 1), group, axis=1)  # [B, Hq, R, blocks]
  return blocks[..., jnp.arange(t) // cfg.slc_block]


def passkey_probe(filler, seq_len: int, samples: int, seed: int = 1,
                  digits: int = tasks.DIGITS):
  """`(tokens [B, seq_len - 1], queries [digits], targets [B, digits])` of passkey sequences of
  `seq_len` tokens with needles at random depths: the question's answer positions and the
  position of the needle digit each predicts."""
  rng = np.random.default_rng([seed, seq_len])
  depths = rng.uniform(size=samples)
  tokens = np.stack([tasks.passkey_example(rng, filler, seq_len, depth, digits)[0]
                     for depth in depths])[:, :-1]
  targets = np.stack([tasks.passkey_key_start(seq_len, depth, digits) + np.arange(digits)
                      for depth in depths])  # [B, digits]
  return tokens, tasks.passkey_answer_targets(seq_len, digits), targets


def mqar_probe(seq_len: int, num_pairs: int, vocab_size: int, placement: str, samples: int,
               seed: int = 1, ids: int = 0):
  """`(tokens [B, seq_len - 1], queries [pairs], targets [B, pairs])` of MQAR sequences: the
  queried keys' positions and the position of each queried pair's value."""
  rng = np.random.default_rng([seed, seq_len])
  examples = [tasks.mqar_example(rng, seq_len, num_pairs, vocab_size, placement, ids)
              for _ in range(samples)]
  tokens = np.stack([t for t, _ in examples])[:, :-1]
  values = np.stack([p for _, p in examples]) + 1  # [B, pairs]
  return tokens, tasks.mqar_answer_targets(seq_len, num_pairs), values
