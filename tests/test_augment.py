"""Cached-frame augmentation: deterministic for a seed, shapes and amounts as asked."""
import numpy as np

from stage2_train.augment import augment_frames


def test_augmentation_is_deterministic_and_does_what_it_says():
    x = [np.arange(40 * 3, dtype=np.float32).reshape(40, 3) + 1.0]
    a = augment_frames(x, np.random.default_rng(1), speed=0.2, mask=0.25, noise=0.1)
    b = augment_frames(x, np.random.default_rng(1), speed=0.2, mask=0.25, noise=0.1)
    np.testing.assert_array_equal(a[0], b[0])
    assert 33 <= len(a[0]) <= 50 and a[0].shape[1] == 3           # speed 0.8-1.2: 40 frames -> 33..50
    m = augment_frames(x, np.random.default_rng(2), mask=0.25)[0]
    assert m.shape == (40, 3) and (m == 0).all(axis=1).sum() == 10  # one span of 25% zeroed
    assert np.array_equal(augment_frames(x, np.random.default_rng(3))[0], x[0])   # all off: unchanged
    n = augment_frames(x, np.random.default_rng(4), noise=0.5)[0]
    assert not np.array_equal(n, x[0]) and abs(float((n - x[0]).mean())) < 3.0
    s = augment_frames([np.ones((1, 3), np.float32)], np.random.default_rng(5), speed=0.5, mask=0.5, noise=1.0)
    assert s[0].shape == (1, 3)                                    # a one-frame chunk survives everything
