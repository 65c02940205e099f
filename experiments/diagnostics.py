"""What an NSA model's selection and branch gates do at the positions that must retrieve.

Training logs these at every evaluation of a retrieval task with NSA attention or its
ablations (`metrics.jsonl`: `gates_at_answers`, per layer the mean compressed / selected / window
gate, and with the selected branch `selection_hits`, one fraction per layer), and
`experiments.plot` writes them for a finished run.
When a run does not retrieve they tell the cases apart: a selection that never holds the
answer's block (the ranking did not learn), one that holds it while the selected gate is closed,
or a compressed gate that closed and so stopped training the ranking (the selection's scores are
the compressed branch's attention, whose only gradient comes through that gate).
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


def at_answers(model, tokens, queries, target_blocks) -> dict:
  """The selection and gates at the positions that must retrieve.

  Args:
    model: an NSA `DecoderLM`.
    tokens: int `[B, T]` inputs.
    queries: int `[Q]` positions that predict an answer token.
    target_blocks: int `[B, Q]` the selection block each of them must read.

  Returns:
    `{"gates_at_answers": [L][3] mean gate of each branch over the queries and heads,
    "selection_hits": [L] fraction of (query, KV head) pairs whose selection holds the target
    block (only for layers with the selected branch)}`, plain lists.
  """
  indices, gates = layer_internals(model, tokens)
  found = dict(gates_at_answers=gates[:, :, queries].mean(axis=(1, 2, 3)).tolist())
  if indices is not None:
    at_queries = indices[:, :, queries]  # [L, B, Q, Hkv, n]
    hits = np.any(at_queries == np.asarray(target_blocks)[None, :, :, None, None], axis=-1)
    found["selection_hits"] = hits.reshape(hits.shape[0], -1).mean(-1).tolist()
  return found


def passkey_probe(filler, seq_len: int, slc_block: int, samples: int, seed: int = 1):
  """`(tokens [B, seq_len - 1], queries [5], target_blocks [B, 5])` of passkey sequences of
  `seq_len` tokens with needles at random depths: the question's answer positions and the
  selection block of the needle digit each predicts."""
  rng = np.random.default_rng([seed, seq_len])
  depths = rng.uniform(size=samples)
  tokens = np.stack([tasks.passkey_example(rng, filler, seq_len, depth)[0]
                     for depth in depths])[:, :-1]
  digits = np.stack([tasks.passkey_key_start(seq_len, depth) + np.arange(tasks.DIGITS)
                     for depth in depths])  # [B, DIGITS]
  return tokens, tasks.passkey_answer_targets(seq_len), digits // slc_block


def mqar_probe(seq_len: int, num_pairs: int, vocab_size: int, placement: str, slc_block: int,
               samples: int, seed: int = 1):
  """`(tokens [B, seq_len - 1], queries [pairs], target_blocks [B, pairs])` of MQAR sequences:
  the queried keys' positions and the selection block of each pair's value."""
  rng = np.random.default_rng([seed, seq_len])
  examples = [tasks.mqar_example(rng, seq_len, num_pairs, vocab_size, placement)
              for _ in range(samples)]
  tokens = np.stack([t for t, _ in examples])[:, :-1]
  value_block = (np.stack([p for _, p in examples]) + 1) // slc_block  # [B, pairs]
  return tokens, tasks.mqar_answer_targets(seq_len, num_pairs), value_block
