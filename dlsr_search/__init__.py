"""dlsr_search: the DLSR supernet, the differentiable search and the retrain trainer.

Depends on `dlsr_infer` (ops, ESA, cell, genotype, weights format); never the reverse.

Command line: ``dlsr-search {search,train,eval,export}`` (`cli`). Modules, by what they hold:

- `supernet`    MixedOp and SuperNet (alphas, betas, arch/weight parameter split)
- `genotypes`   derive_genotype (alphas/betas -> Genotype) and resolve_genotype (``--genotype``)
- `losses`      L1, HFEN, the differentiable parameter loss L_P
- `search`      SearchConfig, search(), search_step() (MiLeNAS)
- `train`       TrainConfig, train() (retrain; warm start, best/last, export)
- `data`        in-memory HR/LR pairs, deterministic patch stream, step-indexed sampler
- `validation`  PSNR-Y on whole images (benchmark protocol)
- `checkpoint`  atomic, weights_only-loadable checkpoints and RNG states
- `config`      config (de)serialisation and the resume rules
- `distributed` torchrun process group, gradient averaging
- `transfer`    warm start from another model (shape-matching tensors)
- `export`      checkpoint -> model directory
- `runtime`, `runlog`, `synthetic`  threads/signals, logs, synthetic images for tests and benchmarks
"""
