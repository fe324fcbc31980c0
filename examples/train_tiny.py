"""Train the tiny NÜWA preset on procedurally generated moving-shape videos, on CPU, and compare
nearby (3DNA), axial and full attention at equal steps.

    python examples/train_tiny.py                 # 200 steps each, a few minutes on a laptop CPU
    python examples/train_tiny.py --steps 50 --attention nearby full
"""

from nuwa.train import main

if __name__ == "__main__":
    main()
