"""The fast paths of routing. Each is used only where it applies, falls back to the eager path
(:mod:`msa_memory.routing.scoring`, the reference) when it fails, and is tested against it
(``tests/equivalence/test_routing_cpu_kernel.py``, ``test_routing_paths.py``):

- ``cpu_avx512``: bf16 keys in a blocked layout scored by an AVX512-BF16 C++ extension (``csrc/``),
  built at first use; applies on CPUs with AVX512-BF16 unless ``RoutingConfig.cpu_kernel`` or
  ``MSA_CPU_KERNEL=0`` turn it off.
- ``fused_triton``: query-reduce-max scores and the chunk-max document top-k as Triton kernels; applies
  on CUDA where triton imports (``RoutingConfig.fused_scores`` / ``fused_topk``).
- ``cuda_graph``: one layer's whole route captured and replayed as a CUDA graph
  (``RoutingConfig.cuda_graphs``).

:class:`msa_memory.routing.index.RouterIndex` chooses among them; a new kernel is one module here
plus its equivalence test.
"""
