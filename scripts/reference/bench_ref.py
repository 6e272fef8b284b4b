"""Times the Python reference's search step or training step on synthetic data, the same steps
as `noisydarts bench search-step` / `train-step` (docs/bench.md), and prints one JSON line
{"s_per_iter", "s_min", "s_max", "peak_rss_mb"}. Run it from the copy that setup.sh makes (it
imports the reference's modules from its own directory), with Debian's /usr/bin/python3."""
import argparse, json, os, resource, sys, time, types
import torch, torch.nn as nn
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument('mode', choices=['search', 'train'])
p.add_argument('--in-channels', type=int, default=3)
p.add_argument('--image-size', type=int, default=32)
p.add_argument('--channels', type=int, default=16)
p.add_argument('--layers', type=int, default=8)
p.add_argument('--batch-size', type=int, default=64)
p.add_argument('--iters', type=int, default=5)
p.add_argument('--warmup', type=int, default=2)
p.add_argument('--threads', type=int, default=2)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
crit = nn.CrossEntropyLoss()
B, Cin, S = a.batch_size, a.in_channels, a.image_size
def batch():
    return torch.randn(B, Cin, S, S), torch.randint(0, 10, (B,))
if a.mode == 'search':
    import model_search
    from architect import Architect
    args = types.SimpleNamespace(noise_decay=False, noise_type='gaussian', factor_skip=0.2, noise_mean=0.0,
                                 noise_mixture='additive', add_noise_skip=True, momentum=0.9, weight_decay=3e-4,
                                 arch_learning_rate=3e-4, arch_weight_decay=1e-3)
    model = model_search.Network(a.channels, 10, a.layers, crit, args=args, drop_prob=0.3)
    if Cin != 3:
        model.stem[0] = nn.Conv2d(Cin, 3 * a.channels, 3, padding=1, bias=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    arch = Architect(model, args)
    def arch_step(xv, yv):
        arch.step(None, None, xv, yv, 0.025, opt, unrolled=False, epoch=0)
    def weight_step(x, y):
        opt.zero_grad()
        loss = crit(model(x, 0), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5)
        opt.step()
    def step():
        xv, yv = batch(); x, y = batch()
        arch_step(xv, yv)
        weight_step(x, y)
else:
    import model, genotypes
    net = model.NetworkCIFAR(a.channels, 10, a.layers, True, genotypes.noisy_darts_a)
    net.drop_path_prob = 0.2
    net.train()
    opt = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    def step():
        x, y = batch()
        opt.zero_grad()
        logits, aux = net(x)
        loss = crit(logits, y) + 0.4 * crit(aux, y)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5)
        opt.step()
for _ in range(a.warmup):
    step()
ts = []
for _ in range(a.iters):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
ts.sort()
print(json.dumps({'s_per_iter': ts[len(ts) // 2], 's_min': ts[0], 's_max': ts[-1],
                  'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
