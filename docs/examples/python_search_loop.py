#!/usr/bin/env python3
"""A custom first-order DARTS/NoisyDARTS search loop in Python over noisydarts' supernet (docs/python.md).

Each iteration: one architecture step (Adam on the alphas, on a batch of the architecture half),
then one weight step (SGD on the network weights, on a batch of the weight half), as in the
search the CLI runs. The forward and backward run through noisydarts' fused C++ kernels; the
optimisers, the data and the loop are plain PyTorch.

Run:  PYTHONPATH=build/python /usr/bin/python3 docs/examples/python_search_loop.py --steps 20
The data are synthetic (10 classes, each a fixed random 28x28 pattern plus noise), so the script
needs no dataset files.
"""
import argparse
import math

import torch
import torch.nn.functional as F

import noisydarts


def synthetic_batches(n_classes, batch_size, generator):
    """An endless stream of (x [B, 1, 28, 28], y [B]) batches: class pattern + Gaussian noise."""
    patterns = torch.randn(n_classes, 1, 28, 28, generator=generator)
    while True:
        y = torch.randint(0, n_classes, (batch_size,), generator=generator)
        x = patterns[y] + 0.8 * torch.randn(batch_size, 1, 28, 28, generator=generator)
        yield x, y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="search iterations")
    ap.add_argument("--channels", type=int, default=8, help="initial channels C (even)")
    ap.add_argument("--layers", type=int, default=5, help="number of cells L")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--noise-lambda", type=float, default=0.2, help="NoisyDARTS: noise on the skip connections")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="write the supernet's state dict (weights and alphas) to this file")
    args = ap.parse_args()

    net = noisydarts.SearchNetwork(C=args.channels, num_classes=10, layers=args.layers, in_channels=1,
                                   noise={"lambda": args.noise_lambda}, seed=args.seed)
    # The two parameter groups of DARTS: the alphas (architecture) and everything else (weights).
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    lr_at = lambda step: 0.001 + 0.5 * (0.05 - 0.001) * (1 + math.cos(math.pi * step / args.steps))  # noqa: E731

    g = torch.Generator().manual_seed(args.seed)
    weight_half = synthetic_batches(10, args.batch_size, g)
    arch_half = synthetic_batches(10, args.batch_size, g)
    alphas_start = [a.detach().clone() for a in net.arch_parameters()]

    net.train()
    for step in range(args.steps):
        # Architecture step: gradient of the loss on the architecture half w.r.t. the alphas only.
        x, y = next(arch_half)
        a_opt.zero_grad()
        arch_loss = F.cross_entropy(net(x), y)
        arch_loss.backward(inputs=net.arch_parameters())
        a_opt.step()

        # Weight step: the weight half, gradient-norm clip 5 as in the paper's recipe.
        for group in w_opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = next(weight_half)
        w_opt.zero_grad()
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward(inputs=net.weight_parameters())
        torch.nn.utils.clip_grad_norm_(net.weight_parameters(), 5.0)
        w_opt.step()
        acc = (logits.argmax(1) == y).float().mean().item() * 100
        print(f"step {step + 1}/{args.steps}  train loss {loss.item():.3f} acc {acc:.1f}%  arch loss {arch_loss.item():.3f}")

    moved = max((a.detach() - a0).abs().max().item() for a, a0 in zip(net.arch_parameters(), alphas_start))
    print(f"alphas moved: max |alpha - alpha_0| = {moved:.4g}")
    # softmax(alphas_normal): the strength of each candidate op on edge 0.
    weights = net.arch_weights(0)[0]
    print("edge 0: " + ", ".join(f"{op} {w:.3f}" for op, w in zip(net.candidates(), weights.tolist())))
    if args.save:  # the layout `noisydarts export` writes: `noisydarts predict --search-network` reads it
        torch.save(net.state_dict(), args.save)
    print(f"genotype: {net.genotype()}")


if __name__ == "__main__":
    main()
