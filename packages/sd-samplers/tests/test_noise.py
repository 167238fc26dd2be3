"""The Brownian-tree noise: one fixed path per seed, standard normal increments."""

import torch

from sd_samplers import BrownianTreeNoise

X = torch.zeros(1, 20000)


def test_increments_are_standard_normal_and_consistent():
    tree = BrownianTreeNoise(X, 0.03, 14.6, generator=torch.Generator().manual_seed(0))
    a, b, c = 9.0, 2.5, 0.7
    ab, bc, ac = tree(a, b), tree(b, c), tree(a, c)
    for z in (ab, bc, ac):
        assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    # increments of one path: W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b))
    torch.testing.assert_close(ac * (a - c) ** 0.5, ab * (a - b) ** 0.5 + bc * (b - c) ** 0.5)
    # disjoint increments are independent; nested ones correlate as sqrt(len ratio)
    assert abs((ab * bc).mean().item()) < 0.03
    corr = (ab * ac).mean().item()
    assert abs(corr - ((a - b) / (a - c)) ** 0.5) < 0.03


def test_the_path_depends_on_the_seed_not_on_the_query_order():
    def make():
        return BrownianTreeNoise(X, 0.03, 14.6, generator=torch.Generator().manual_seed(5))

    t1, t2 = make(), make()
    first = t1(3.0, 1.0)
    t2(14.0, 0.1), t2(0.5, 0.2)  # other queries first
    assert torch.equal(first, t2(3.0, 1.0))
    other = BrownianTreeNoise(X, 0.03, 14.6, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(first, other(3.0, 1.0))
