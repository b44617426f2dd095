"""Timing helpers shared by the PyTorch probes of bench/dev: a callable captured as a CUDA graph
(no host launch cost, as in flare's step graph) and replayed between two CUDA events."""
import statistics

import torch


def graphed(fn, burst):
    """`fn` called `burst` times, captured as one CUDA graph after 3 warm-up calls on a side
    stream (what capture requires), replayed once and synchronised."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(burst):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph, times=1):
    """ms of `times` back-to-back replays of `graph`, between two events."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(times):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def timed(fn, reps=30, burst=10):
    """Median µs per call of `fn` over `reps` replays of a CUDA graph of `burst` calls."""
    graph = graphed(fn, burst)
    return statistics.median(replay_ms(graph) * 1000 / burst for _ in range(reps))


def mm_f32(a, b):
    """a @ b with an f32 output from bf16 operands, as flare's LoRA factor gradients."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except TypeError:
        return a @ b
