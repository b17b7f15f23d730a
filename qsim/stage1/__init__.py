"""Stage 1 of the replay: requests -> the exact stream of L2 cache events QEMU 7.2's qcow2 driver makes.

What QEMU does to its L2 cache for a request stream does not depend on the cache size: which slices are looked up,
created empty (``get_empty``) or dirtied, and where the caches are flushed, are fixed by the trace, the image state,
the geometry and the slice (entry) size. This package follows QEMU's code paths (block/qcow2.c qcow2_co_preadv_part,
qcow2_co_pwritev_part, handle_alloc_space; block/qcow2-cluster.c qcow2_get_host_offset, qcow2_alloc_host_offset,
handle_copied, handle_alloc, calculate_l2_meta, perform_cow, qcow2_alloc_cluster_link_l2, l2_allocate) request by
request. Allocation state makes this inherently sequential, so it is one numba kernel; its events go to stage 2
(``qsim.lru``), which turns them into hits, misses and write-backs for every cache size at once.

It is split by idea: ``structs`` (the numba structrefs the kernel's arrays travel in, their field and index
names, and the recording of events), ``entries`` (the accessors every kernel reads and writes L2 entries
through), ``lookup`` (the qcow2_get_host_offset family: subcluster types, extents,
reads, what is asked of a backing image), ``write`` (handle_copied, handle_alloc, COW, l2_allocate, linking) and
``driver`` (``run_requests``: the request loop with its fast paths). ``qsim.engine`` runs it over a trace.

The kernel's arrays travel in two structs (numba structrefs) rather than as separate arguments, as views that
borrow the caller's memory: numba counts references (atomically) on every array argument of every call and every
field read, which cost about 2 us per write when 25 arrays went down five calls deep. ``Run`` holds the image's
L2 mapping in ``L2View``'s own fields (so it is passed wherever a view is) and everything a run changes: the
allocator's maps, the event and backing-request buffers, counters and scratch rows; the qcow2 layers of the
backing chain below are a list of ``L2View``s of their own, which the copy-on-write zero check walks down. Reads
and overwrites that are one lookup take a fast path in ``driver.run_requests``; the tests hold it to the general
code.

Event keys are dense slice ids: ``table slot x slices per table + slice index`` (slots number L2 tables in the order
they appear), equivalent to QEMU's key (the slice's host offset) because tables never move or get freed here.
"""
