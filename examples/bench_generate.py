"""Cost of one generation step with the key/value cache vs one full decoder pass (what a step costs
when generation recomputes the decoder), on growing target grids.

    python examples/bench_generate.py

With the cache the step cost stays flat (it reads only the new token's window); the full pass grows
with the number of tokens.
"""

import time

import torch

from nuwa import Nuwa, NuwaConfig


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = NuwaConfig.tiny(
        dim=128, heads=4, num_kv_heads=4, encoder_layers=2, decoder_layers=4, target_grid=(10, 21, 21), codebook_size=512
    )
    model = Nuwa(cfg).eval()
    condition = torch.randint(0, cfg.condition_vocab_size, (1, 8, 1, 1))
    print(f"{'grid':>12} | {'tokens':>6} | {'cached step (ms)':>16} | {'full decoder pass (ms)':>22}")
    with torch.no_grad():
        memory = model.encode(condition)
        for grid in [(4, 8, 8), (8, 16, 16), (10, 21, 21)]:
            n = grid[0] * grid[1] * grid[2]
            caches = model.init_caches(memory, grid)
            step = lambda: model.decode_step(torch.tensor([[3]]), torch.tensor([n - 1]), grid, caches)  # noqa: E731
            inputs = torch.randint(0, cfg.codebook_size, (1, *grid))
            full = lambda: model.decode(inputs, memory)  # noqa: E731
            print(f"{str(grid):>12} | {n:6d} | {1000 * best_of(step):16.2f} | {1000 * best_of(full, 2):22.1f}")


if __name__ == "__main__":
    main()
