"""Decoder blocks: a model's decoder layers run block by block, on the actors that hold them.

What a prune, a search's resident pipelines and a guided merge's statistics pass share:

- `decoder`: a `DecoderBlock` — some of a Hugging Face decoder model's layers (plus the
  embeddings on the first block, the final norm and head on the last), built from `config.json`
  and a checkpoint source with no architecture hard-coded; `describe_model` (`ModelShape`);
- `stage`: a `PruneStage` — a block with its calibration statistics and the prune methods of
  `raymerge.pruning` applied to it layer by layer;
- `activations`: AIM's and ACM's activation collectors on a block;
- `gradients`: Sens-Merging's backward passes through a block;
- `pipeline`: micro-batches through the blocks of several stage actors (`Pipeline`,
  `even_stages`).

torch and transformers, no Ray: the actors that hold blocks are `runtime.pool_actor.PoolActor`s,
and the pipeline's driver supplies how handles are waited for.
"""
