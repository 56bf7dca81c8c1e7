"""What the suites share: XLA's memory accounting of a compiled program, and medians of timed calls."""
import os
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compiled_memory(fn, *args, donate_argnums=()) -> dict:
    """XLA's own accounting of a compiled program (bytes -> GiB)."""
    start = time.time()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return dict(memory_gib(compiled), compile_s=round(time.time() - start, 1))


def memory_gib(compiled) -> dict:
    """A compiled program's arguments, outputs, temporaries and peak (GiB; donated arguments that
    alias outputs count once), from XLA's memory analysis."""
    m = compiled.memory_analysis()
    gib = lambda b: round(b / 2 ** 30, 3)
    return {"arguments_gib": gib(m.argument_size_in_bytes), "outputs_gib": gib(m.output_size_in_bytes),
            "temporaries_gib": gib(m.temp_size_in_bytes),
            "peak_gib": gib(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                            - m.alias_size_in_bytes)}


def median_ms(fn, repeats: int) -> float:
    import numpy as np

    fn()
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times)), 2)


def alternating_rounds(sides: dict, rounds: int, steps: int) -> dict:
    """Seconds of each of `rounds` rounds of `steps` calls per side, the sides alternating within a
    round (so all see the same machine state), after two warm-up calls each (JAX compiles there)."""
    seconds = {name: [] for name in sides}
    for step in sides.values():
        step(), step()
    for _ in range(rounds):
        for name, step in sides.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[name].append(time.perf_counter() - start)
    return seconds
