"""Motion supervision, bilinear patch sampling, point tracking and the mask term (pure functions)."""
import torch

from dragdiffusion.motion import (all_reached, bilinear_sample, mask_loss, motion_supervision_loss, patch_coords,
                                  track_points)


def ramp(h=9, w=11):
    rows = torch.arange(h).float()[:, None].expand(h, w)
    cols = torch.arange(w).float()[None, :].expand(h, w)
    return torch.stack([rows, cols, rows * 10 + cols])  # [3, h, w], linear in row and col


def test_bilinear_sample_is_exact_on_a_linear_map():
    feat = ramp()
    pts = torch.tensor([[2.25, 3.5], [0.0, 0.0], [7.9, 9.1]])
    out = bilinear_sample(feat, pts)
    assert out.shape == (3, 3)
    assert torch.allclose(out[:, 0], pts[:, 0], atol=1e-5)
    assert torch.allclose(out[:, 1], pts[:, 1], atol=1e-5)
    assert torch.allclose(out[:, 2], pts[:, 0] * 10 + pts[:, 1], atol=1e-4)


def test_bilinear_sample_clamps_at_the_bottom_right_border():
    feat = ramp(9, 11)
    # a handle on the last row/col shifted outward: values are the border's, finite, no index error
    out = bilinear_sample(feat, torch.tensor([[8.0 + 0.7, 10.0 + 0.7], [-0.5, -2.0]]))
    assert torch.allclose(out[0, :2], torch.tensor([8.0, 10.0]))
    assert torch.allclose(out[1, :2], torch.tensor([0.0, 0.0]))


def test_patch_coords_clip_to_grid():
    assert patch_coords(torch.tensor([4.0, 5.0]), 1, (9, 11)).shape == (9, 2)
    corner = patch_coords(torch.tensor([8.0, 10.0]), 1, (9, 11))
    assert corner.shape == (4, 2) and corner.max(0).values.tolist() == [8.0, 10.0]


def test_motion_loss_at_the_border_has_gradient_and_is_finite():
    feat = torch.randn(4, 9, 11, requires_grad=True)
    loss = motion_supervision_loss(feat, torch.tensor([[8.0, 10.0]]), torch.tensor([[0.0, 0.0]]), r_m=1)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and feat.grad.abs().sum() > 0


def test_motion_loss_skips_handles_already_near_their_target():
    feat = torch.randn(4, 9, 11)
    assert motion_supervision_loss(feat, torch.tensor([[4.0, 4.0]]), torch.tensor([[4.0, 5.5]]), 1) == 0
    assert motion_supervision_loss(feat, torch.tensor([[4.0, 4.0]]), torch.tensor([[4.0, 6.0]]), 1) > 0


def test_tracking_finds_a_planted_feature_match():
    g = torch.Generator().manual_seed(0)
    feat0 = torch.randn(8, 20, 20, generator=g)
    feat1 = torch.randn(8, 20, 20, generator=g)
    init = torch.tensor([[10.0, 10.0]])
    feat1[:, 12, 8] = feat0[:, 10, 10]  # the handle's content now sits at (12, 8), inside r_p = 3
    new = track_points(feat0, feat1, init, init.clone(), r_p=3)
    assert new.tolist() == [[12.0, 8.0]]
    # outside the window it cannot be found
    feat1[:, 12, 8] = torch.randn(8, generator=g)
    feat1[:, 16, 10] = feat0[:, 10, 10]
    assert track_points(feat0, feat1, init, init.clone(), r_p=3).tolist() != [[16.0, 10.0]]


def test_tracking_window_is_clipped_at_the_edge():
    feat0 = torch.randn(4, 10, 10)
    feat1 = torch.randn(4, 10, 10)
    feat1[:, 9, 9] = feat0[:, 9, 9]
    h = torch.tensor([[9.0, 9.0]])
    assert track_points(feat0, feat1, h, h.clone(), r_p=3).tolist() == [[9.0, 9.0]]


def test_tracking_all_handles_at_once_equals_the_window_by_window_search():
    """The batched search equals the reference's loop over handles and clipped windows, ties and edges included."""
    g = torch.Generator().manual_seed(0)
    feat0, feat1 = torch.randn(5, 12, 9, generator=g), torch.randn(5, 12, 9, generator=g).round()  # ties likely
    init = torch.tensor([[0.0, 0.0], [11.0, 8.0], [5.7, 3.2], [2.0, 8.0]])
    handles = torch.tensor([[1.0, 0.0], [11.0, 7.9], [6.2, 4.0], [0.0, 8.0]])

    def loop(r_p):
        out = handles.clone()
        for i in range(len(handles)):
            ref = feat0[:, int(init[i, 0]), int(init[i, 1])]
            r, c = int(handles[i, 0]), int(handles[i, 1])
            r1, r2, c1, c2 = max(0, r - r_p), min(12, r + r_p + 1), max(0, c - r_p), min(9, c + r_p + 1)
            idx = int(torch.argmin((feat1[:, r1:r2, c1:c2] - ref[:, None, None]).abs().sum(0)))
            out[i] = torch.tensor([r1 + idx // (c2 - c1), c1 + idx % (c2 - c1)])
        return out

    for r_p in (0, 1, 3, 6):
        assert torch.equal(track_points(feat0, feat1, init, handles, r_p), loop(r_p)), r_p


def test_all_reached_threshold():
    assert all_reached(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), 2.0)
    assert not all_reached(torch.tensor([[0.0, 0.0], [5.0, 5.0]]), torch.tensor([[1.0, 1.0], [5.0, 8.0]]), 2.0)


def test_mask_loss_is_a_sum_outside_the_mask_only():
    x = torch.zeros(1, 4, 4, 4)
    x0 = torch.ones(1, 4, 4, 4)
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :] = 1  # top half may change
    assert abs(mask_loss(x, x0, m, lam=0.1).item() - 0.1 * 4 * 8) < 1e-5  # 4 channels x 8 frozen cells
    assert mask_loss(x, x0, torch.ones_like(m), lam=0.1).item() == 0


def blob(h, w, center, sigma=1.5):
    rows = torch.arange(h).float()[:, None]
    cols = torch.arange(w).float()[None, :]
    return torch.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2) / (2 * sigma ** 2))


def test_optimizing_the_motion_loss_moves_planted_content_toward_the_target():
    """Identity-like features (F = z): drag a blob from (16, 10) toward (16, 22) with tracking."""
    h, w = 32, 32
    torch.manual_seed(0)
    z0 = 0.05 * torch.randn(3, h, w)
    z0[0] += blob(h, w, (16, 10))
    z0[1] += 0.5 * blob(h, w, (16, 10), 3.0)
    z = torch.nn.Parameter(z0.clone())
    opt = torch.optim.Adam([z], lr=0.05)
    handle_init = torch.tensor([[16.0, 10.0]])
    handle = handle_init.clone()
    target = torch.tensor([[16.0, 22.0]])
    feat0 = z0.clone()
    for step in range(60):
        if step > 0:
            handle = track_points(feat0, z.detach(), handle_init, handle, r_p=3)
        if all_reached(handle, target, 2.0):
            break
        loss = motion_supervision_loss(z, handle, target, r_m=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    start_dist = (target - handle_init).norm().item()
    end_dist = (target - handle).norm().item()
    assert end_dist < start_dist / 2
    # the content itself moved: the blob's peak column went right
    assert z.detach()[0, 16].argmax().item() > 12
