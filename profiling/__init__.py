"""Ground layer of ltx2-graphs: prove that PyTorch code never makes the host wait for the device.

Modules (import what you need; nothing is imported here, and nothing here knows about LTX-2):

* ``ranges``      -- ``region(name)``: NVTX ranges in domain "ltx2" plus a per-thread region stack;
* ``syncs``       -- host-sync detectors (dispatch level, CPU and GPU), ``allow_host_sync``, ``cuda_sync_debug``;
* ``sync_rules``  -- which torch calls synchronise the host, and why;
* ``control``     -- the positive control every profile must see;
* ``timeline``, ``attribution``, ``report``, ``trace`` -- profiler-neutral records -> per-region report
  (table, JSON) and Chrome/Perfetto trace;
* ``cupti``       -- in-process CUPTI profiler (GPU, optional ``cupti`` extra);
* ``nsys``        -- the same report from an Nsight Systems SQLite export (``python -m profiling.nsys``);
* ``timing``      -- ``time_cuda``, ``TimingStats``, ``matmul_peak_tflops``;
* ``gpu_clocks``  -- SM clock and board power sampled (NVML) while timed work runs: is the card power-capped;
* ``kernel_table`` -- the kernels with the most time and the idle gaps of a profiled window;
* ``pytest_plugin`` -- the ``no_host_sync`` fixture and marker (entry point ``ltx2_graphs``).
"""
