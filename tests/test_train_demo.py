"""The demo model's trainer (python -m nulltext.demo.train) on a few steps: it writes a model folder that nulltext loads, an
interrupted run resumes to the same weights as an uninterrupted one, and --init-from keeps the
VAE it starts from and fine-tunes the rest on one- and two-object scenes; the token grounding
loss against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from nulltext import load_pipeline
from nulltext.demo import train_data, train_losses, train_stages

SMALL = ["--train-scenes", "16", "--batch", "2", "--vae-steps", "3", "--ckpt-every", "2",
         "--sample-steps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def train():
    from nulltext.demo import train as mod

    return mod


def weights(model_dir):
    pipe = load_pipeline(str(model_dir), device="cpu")
    return {f"{name}.{k}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def same(a, b, prefix=""):
    return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


@pytest.fixture(scope="module")
def straight(train, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train.main(["-o", str(out), "--unet-steps", "3", *SMALL])
    return out


@pytest.mark.slow  # a training run
def test_training_writes_a_model_nulltext_loads_with_plots(straight):
    assert (straight / "model" / "model_index.json").is_file()
    assert (straight / "losses.png").is_file() and (straight / "samples.png").is_file()
    pipe = load_pipeline(str(straight / "model"), device="cpu")
    assert pipe.native_size == (64, 64) and pipe.tokenizer.model_max_length == 16


@pytest.mark.slow  # a training run
def test_an_interrupted_run_resumes_to_the_same_weights(train, straight, tmp_path, monkeypatch, capsys):
    save = train_stages.save_ckpt

    def save_then_die(path, **state):
        save(path, **state)
        if "unet" in state and state["step"] == 2:
            raise KeyboardInterrupt  # killed right after the UNet's step-2 checkpoint

    monkeypatch.setattr(train_stages, "save_ckpt", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(["-o", str(tmp_path), "--unet-steps", "3", *SMALL])
    assert not (tmp_path / "model").exists()
    monkeypatch.setattr(train_stages, "save_ckpt", save)
    capsys.readouterr()
    train.main(["-o", str(tmp_path), "--unet-steps", "3", *SMALL])  # the same command resumes
    assert "resuming UNet at step 2" in capsys.readouterr().out
    assert same(weights(straight / "model"), weights(tmp_path / "model"))  # seeded: same batches, same weights


@pytest.mark.slow  # a training run
def test_init_from_keeps_the_vae_and_trains_on_pairs(train, straight, tmp_path):
    train.main(["-o", str(tmp_path), "--init-from", str(straight / "model"), "--train-pairs", "8",
                "--unet-steps", "2", "--ground-weight", "0.1", *SMALL])
    before, after = weights(straight / "model"), weights(tmp_path / "model")
    assert same(before, after, "vae.")
    assert not same(before, after, "unet.") and not same(before, after, "text_encoder.")
    log = (tmp_path / "log.jsonl").read_text()
    assert '"val_psnr_pairs"' in log and '"stage": "vae"' not in log  # no VAE stage was run
    assert '"ground"' in log  # the grounding loss was on
    # the saved UNet runs with diffusers' own processors again
    pipe = load_pipeline(str(tmp_path / "model"), device="cpu")
    assert not any(type(p).__name__ == "GroundingProcessor" for p in pipe.unet.attn_processors.values())


def one_image_maps():
    """One image, 2x2 latent, 3 tokens: token 1 names region 0 (the object, coverage 1, 0.5, 0, 0),
    token 2 region 2 (the background); random attention probabilities (B, heads, Q, K) whose rows
    sum to 1. Returns regions, roles, probs."""
    regions = torch.zeros(1, 3, 2, 2)
    regions[0, 0] = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    regions[0, 2] = 1 - regions[0, 0]
    roles = torch.tensor([[-1, 0, 2]], dtype=torch.int8)
    p = torch.rand(1, 2, 4, 3) + 0.1
    return regions, roles, p / p.sum(-1, keepdim=True)


def test_grounding_loss_hand_computed():
    regions, roles, probs = one_image_maps()
    a = probs.mean(1)[0]  # (Q, K) averaged over heads
    obj, bg = regions[0, 0].flatten(), regions[0, 2].flatten()
    inside1 = (a[:, 1] * obj).sum() / a[:, 1].sum()
    inside2 = (a[:, 2] * bg).sum() / a[:, 2].sum()
    expected = ((1 - inside1) + (1 - inside2)) / 2
    got = train_losses.grounding_loss([probs, probs], regions, roles)  # two layers, same maps
    assert torch.allclose(got, expected, atol=1e-6)
    # a token attending only inside its region costs nothing; one attending only outside costs 1
    perfect = torch.zeros(1, 1, 4, 3)
    perfect[0, 0, 0] = torch.tensor([0.0, 1.0, 0.0])  # pixel (0,0): fully object
    perfect[0, 0, 1:] = torch.tensor([0.0, 0.0, 1.0])
    perfect[0, 0, 3, 0] = 1.0  # token 0 has no region: ignored
    perfect[0, 0, 3, 2] = 0.0
    roles_obj = torch.tensor([[-1, 0, -1]], dtype=torch.int8)
    assert train_losses.grounding_loss([perfect], regions, roles_obj).item() == pytest.approx(0.0)
    roles_wrong = torch.tensor([[-1, 2, -1]], dtype=torch.int8)  # token 1 said to name the background
    assert train_losses.grounding_loss([perfect], regions, roles_wrong).item() == pytest.approx(1.0)
    # at a coarser layer the regions are averaged down (4x4 -> 2x2)
    big = regions.repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert torch.allclose(train_losses.grounding_loss([probs], big, roles), expected, atol=1e-6)


def test_grounding_pixel_loss_hand_computed():
    regions, roles, probs = one_image_maps()
    a = probs.mean(1)[0]  # (Q, K)

    def bce(x, y):  # by hand, per pixel
        return -(y * torch.log(x) + (1 - y) * torch.log(1 - x))

    obj, bg = regions[0, 0].flatten(), regions[0, 2].flatten()
    expected = (bce(a[:, 1], obj).mean() + bce(a[:, 2], bg).mean()) / 2
    got = train_losses.grounding_pixel_loss([probs, probs], regions, roles)
    assert torch.allclose(got, expected, atol=1e-5)
    # two images with different numbers of grounded tokens, two layers of different sizes (2x2 and
    # 1x1, where the regions are averaged down): mean over each layer's grounded tokens, then layers
    regions2 = torch.cat([regions, regions.flip(-1)])
    roles2 = torch.tensor([[-1, 0, 2], [-1, 0, -1]], dtype=torch.int8)
    p2 = torch.rand(2, 2, 4, 3) + 0.1
    p1 = torch.rand(2, 2, 1, 3) + 0.1
    layers = [p2 / p2.sum(-1, keepdim=True), p1 / p1.sum(-1, keepdim=True)]
    per_layer = []
    for probs_l in layers:
        side = int(probs_l.shape[2] ** 0.5)
        terms = []
        for b in range(2):
            for k in range(3):
                r = int(roles2[b, k])
                if r < 0:
                    continue
                cover = regions2[b, r].reshape(side, 2 // side, side, 2 // side).mean((1, 3)).flatten()
                terms.append(bce(probs_l[b].mean(0)[:, k], cover).mean())
        per_layer.append(torch.stack(terms).mean())
    expected2 = torch.stack(per_layer).mean()
    assert torch.allclose(train_losses.grounding_pixel_loss(layers, regions2, roles2), expected2, atol=1e-5)
    # a word attended by every pixel of its region and by none outside costs (almost) nothing; a map
    # that puts the same mass on one pixel of the region (what grounding_loss alone accepts) costs more
    hard = torch.zeros(1, 3, 2, 2)
    hard[0, 0, 0] = 1.0
    hard[0, 2] = 1 - hard[0, 0]
    covering = torch.zeros(1, 1, 4, 3)
    covering[0, 0, :2, 1] = 1.0  # object pixels attend to token 1
    covering[0, 0, 2:, 2] = 1.0  # background pixels to token 2
    peaked = covering.clone()
    peaked[0, 0, 1] = torch.tensor([1.0, 0.0, 0.0])  # the second object pixel attends elsewhere
    roles_obj = torch.tensor([[-1, 0, -1]], dtype=torch.int8)
    assert train_losses.grounding_loss([peaked], hard, roles_obj).item() == pytest.approx(0.0)  # all mass inside
    assert train_losses.grounding_pixel_loss([covering], hard, roles_obj).item() == pytest.approx(0.0, abs=1e-4)
    assert train_losses.grounding_pixel_loss([peaked], hard, roles_obj).item() > 3.0  # -log(1e-6) / 4


@pytest.mark.parametrize("pairs", [False, True])
def test_token_roles_name_the_caption_words(pairs):
    from transformers import CLIPTokenizer

    from nulltext import demo
    from nulltext.demo import scenes

    tokenizer = CLIPTokenizer.from_pretrained(demo.DEMO_DIR, subfolder="tokenizer")
    x, captions, regions, roles = train_data.make_dataset(4, 7, pairs=pairs)
    made = list((scenes.pair_scenes if pairs else scenes.scenes)(4, 7))
    for s, caption, reg, role in zip(made, captions, regions, roles):
        words = [w.replace("</w>", "") for w in tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)]
        named = {int(r): [words[i] for i in range(len(words)) if role[i] == r] for r in (0, 1, 2)}
        colors = s.colors if pairs else (s.color,)
        shapes = s.shapes if pairs else (s.shape,)
        for j in range(len(colors)):
            assert named[j] == [colors[j], shapes[j]]
        assert named[2] == [s.background, "background"]
        objects = s.masks if pairs else (s.mask,)
        for j, m in enumerate(objects):  # coverage of each 4x4 block by the object
            assert torch.allclose(reg[j].float(), torch.from_numpy(m.reshape(16, 4, 16, 4).mean((1, 3))).float(), atol=1e-3)
        assert torch.allclose(reg.float().sum(0), torch.ones(16, 16), atol=1e-3)


def test_grounding_processor_is_plain_attention_and_keeps_the_maps():
    from diffusers import UNet2DConditionModel

    from nulltext import demo

    unet = UNet2DConditionModel.from_pretrained(demo.DEMO_DIR, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    z, emb = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 16, 128, generator=g)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        plain = unet(z, t, encoder_hidden_states=emb).sample
        store, previous = train_losses.install_grounding(unet)
        kept = unet(z, t, encoder_hidden_states=emb).sample
    assert torch.allclose(plain, kept, atol=1e-5)
    n_cross = sum(name.endswith("attn2.processor") for name in previous)
    assert n_cross > 0 and len(store) == n_cross  # one map per cross-attention layer
    for probs in store:
        assert probs.shape[0] == 2 and probs.shape[-1] == 16  # (B, heads, Q, tokens)
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert sorted({p.shape[2] for p in store}) == [16, 64, 256]  # 4x4 mid, 8x8 and 16x16 levels


def test_composite_batch_takes_the_masked_cells_from_the_other_image():
    from diffusers import AutoencoderKL

    from nulltext import demo

    vae = AutoencoderKL.from_pretrained(demo.DEMO_DIR, subfolder="vae").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    masks = torch.zeros(3, 1, 16, 16)
    masks[0, 0, 2:6, 3:9] = 1  # image 0 takes these cells from image perm[0] = 2
    perm = torch.tensor([2, 0, 1])
    z_mix, x_mix, weight = train_data.composite_batch(vae, x, masks, perm, torch.Generator().manual_seed(1))
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z_mix[0, :, 2:6, 3:9], z[2, :, 2:6, 3:9]) and torch.allclose(z_mix[0, :, 7:], z[0, :, 7:])
    assert torch.equal(z_mix[1:], z[1:])  # empty masks: the image's own latent
    assert torch.equal(x_mix[0, :, 8:24, 12:36], x[2, :, 8:24, 12:36]) and torch.equal(x_mix[0, :, 28:], x[0, :, 28:])
    # the seam: the cells along the rectangle's edge, inside and out, are left out of the loss
    w = weight[0, 0, ::4, ::4]
    # rows 1-6, columns 2-9 hold the rectangle (rows 2-5, columns 3-8) and its outer ring; all
    # but the 2 x 4 cells not touching the edge are seam
    assert (w[1:7, 2:10] == 0).sum() == 6 * 8 - 2 * 4 and w[3:5, 4:8].eq(1).all()
    assert w[7:].eq(1).all() and w[:, 10:].eq(1).all() and w[0].eq(1).all()
    assert weight[1:].eq(1).all()


@pytest.mark.slow  # a training run
def test_decoder_stage_keeps_the_encoder_and_makes_decoding_more_local(train, straight, tmp_path):
    train.main(["-o", str(tmp_path), "--init-from", str(straight / "model"), "--decoder-steps", "4",
                "--decoder-lr", "1e-3", "--unet-steps", "0", *SMALL])
    before, after = weights(straight / "model"), weights(tmp_path / "model")
    assert same(before, after, "vae.encoder.") and same(before, after, "vae.quant_conv.")
    assert not same(before, after, "vae.decoder.")
    assert same(before, after, "unet.")  # no UNet steps
    log = (tmp_path / "log.jsonl").read_text()
    assert '"stage": "decoder", "step": 0' in log and '"composite_psnr"' in log


@pytest.mark.slow  # a training run
def test_calibrated_target_makes_guidance_act_as_the_chosen_scale(straight):
    """--calibrate-guidance W --calibrate-to K: for captioned rows, guidance at W on a conditional
    prediction equal to the target is guidance K on the true noise; empty-caption rows keep the
    plain target; K = W is plain training. eps_u is computed here independently of the script."""
    pipe = load_pipeline(str(straight / "model"), device="cpu")
    unet, text_encoder, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    empty_ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    g = torch.Generator().manual_seed(0)
    zt, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500, 990])
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        eps_u = unet(zt, t, encoder_hidden_states=text_encoder(empty_ids[None].repeat(3, 1))[0]).sample
    for k in (1.0, 2.0):
        target = train_losses.calibrated_target(unet, text_encoder, zt, t, eps, empty_ids, drop, 7.5, k)
        guided = eps_u + 7.5 * (target - eps_u)
        torch.testing.assert_close(guided[~drop], (eps_u + k * (eps - eps_u))[~drop], atol=1e-4, rtol=0)
        assert torch.equal(target[drop], eps[drop])
        assert not torch.allclose(target[~drop], eps[~drop], atol=1e-3)  # the target did move
    torch.testing.assert_close(train_losses.calibrated_target(unet, text_encoder, zt, t, eps, empty_ids, drop, 7.5, 7.5), eps)


@pytest.mark.slow  # a training run
def test_calibrated_training_runs_with_grounding_and_logs_it(train, straight, tmp_path):
    train.main(["-o", str(tmp_path), "--init-from", str(straight / "model"), "--unet-steps", "2",
                "--ground-weight", "0.1", "--ground-pixel-weight", "0.01", "--calibrate-guidance", "7.5", "--calibrate-to", "2",
                "--ema-decay", "0.99", *SMALL])
    before, after = weights(straight / "model"), weights(tmp_path / "model")
    assert not same(before, after, "unet.")
    log = (tmp_path / "log.jsonl").read_text()
    assert '"calibrate_guidance": [7.5, 2.0]' in log and '"ground"' in log and '"ground_pixel"' in log
    with pytest.raises(SystemExit):
        train.main(["-o", str(tmp_path), "--calibrate-guidance", "7.5", "--calibrate-to", "9", *SMALL])


@pytest.mark.slow  # a training run
def test_min_snr_weights_hand_computed(train, straight):
    """--snr-gamma: weight min(SNR, gamma) / SNR with SNR = abar / (1 - abar) from the scheduler's
    own alphas_cumprod: 1 where the sample is noisy (SNR <= gamma), below 1 where it is nearly clean."""
    sched = train.make_scheduler()
    t = torch.tensor([0, 50, 300, 999])
    abar = sched.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    got = train_losses.min_snr_weights(sched, t, 5.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)
    assert got[-1] == 1.0 and got[0] < 0.01 and (got[:-1] <= 1).all()


def test_sample_indices_default_is_uniform_and_pair_fraction_splits():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    # the default draws exactly what the script drew before the option existed
    assert torch.equal(train_data.sample_indices(100, 64, g1, 40, None), torch.randint(100, (64,), generator=g2))
    g = torch.Generator().manual_seed(0)
    assert (train_data.sample_indices(100, 500, g, 40, 0.0) < 40).all()
    assert (train_data.sample_indices(100, 500, g, 40, 1.0) >= 40).all()
    rows = train_data.sample_indices(100, 4000, g, 40, 0.25)
    assert 0.22 < (rows >= 40).float().mean() < 0.28 and rows.min() >= 0 and rows.max() < 100


@pytest.mark.slow  # a training run
def test_snr_gamma_and_pair_fraction_train_and_are_logged(train, straight, tmp_path):
    train.main(["-o", str(tmp_path), "--init-from", str(straight / "model"), "--unet-steps", "2",
                "--train-pairs", "8", "--pair-fraction", "0.5", "--snr-gamma", "5", *SMALL])
    assert not same(weights(straight / "model"), weights(tmp_path / "model"), "unet.")
    log = (tmp_path / "log.jsonl").read_text()
    assert '"snr_gamma": 5.0' in log and '"pair_fraction": 0.5' in log
    for bad in (["--pair-fraction", "0.5"], ["--train-pairs", "8", "--pair-fraction", "1.5"], ["--snr-gamma", "-1"]):
        with pytest.raises(SystemExit):
            train.main(["-o", str(tmp_path / "bad"), *bad, *SMALL])


@pytest.mark.slow  # a training run
def test_teacher_target_makes_guidance_act_as_the_teacher_at_the_chosen_scale(straight):
    """--calibrate-teacher: for captioned rows, guidance at W on a conditional prediction equal to
    the target, with the teacher's own unconditional branch, is the teacher guided at K; empty-caption
    rows keep the true noise; K = W gives the teacher's conditional prediction. The teacher's two
    predictions are computed here, one row at a time, independently of the script's batched forward."""
    pipe = load_pipeline(str(straight / "model"), device="cpu")
    unet, text_encoder, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    def ids(s):
        return tok([s], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]

    empty_ids = ids("")
    rows = torch.stack([ids("a red circle on a blue background"), empty_ids, ids("a green square on a white background")])
    g = torch.Generator().manual_seed(1)
    zt, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([20, 400, 980])
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        def pred(i, r):
            return unet(zt[i:i + 1], t[i:i + 1], encoder_hidden_states=text_encoder(r[None])[0]).sample[0]

        t_c = torch.stack([pred(i, rows[i]) for i in range(3)])
        t_u = torch.stack([pred(i, empty_ids) for i in range(3)])
    for k in (1.0, 2.0, 7.5):
        target = train_losses.teacher_target(unet, text_encoder, zt, t, eps, rows, empty_ids, drop, 7.5, k)
        guided = t_u + 7.5 * (target - t_u)
        torch.testing.assert_close(guided[~drop], (t_u + k * (t_c - t_u))[~drop], atol=1e-4, rtol=0)
        assert torch.equal(target[drop], eps[drop])
        # --teacher-empty: the same captioned rows, the empty-caption row takes the teacher's unconditional prediction
        anchored = train_losses.teacher_target(unet, text_encoder, zt, t, eps, rows, empty_ids, drop, 7.5, k, True)
        torch.testing.assert_close(anchored[~drop], target[~drop], atol=1e-6, rtol=0)
        torch.testing.assert_close(anchored[drop], t_u[drop], atol=1e-5, rtol=0)
        assert not torch.allclose(anchored[drop], eps[drop], atol=1e-2)
    torch.testing.assert_close(train_losses.teacher_target(unet, text_encoder, zt, t, eps, rows, empty_ids, drop, 7.5, 7.5)[~drop],
                               t_c[~drop], atol=1e-5, rtol=0)


@pytest.mark.slow  # a training run
def test_calibrate_teacher_trains_keeps_the_teacher_frozen_and_is_logged(train, straight, tmp_path, monkeypatch):
    before = weights(straight / "model")
    seen = []
    real = train_losses.teacher_target

    def spy(teacher_unet, teacher_text, *rest):  # the teacher at every step: still the --init-from weights
        seen.append(all(torch.equal(v, before[f"unet.{k}"]) for k, v in teacher_unet.state_dict().items())
                    and all(torch.equal(v, before[f"text_encoder.{k}"]) for k, v in teacher_text.state_dict().items()))
        return real(teacher_unet, teacher_text, *rest)

    monkeypatch.setattr(train_stages, "teacher_target", spy)  # as the UNet stage calls it
    train.main(["-o", str(tmp_path), "--init-from", str(straight / "model"), "--unet-steps", "2",
                "--calibrate-guidance", "7.5", "--calibrate-to", "2", "--calibrate-teacher",
                "--ground-weight", "0.1", "--ema-decay", "0.5", *SMALL])
    assert seen == [True, True]
    assert not same(before, weights(tmp_path / "model"), "unet.")
    log = (tmp_path / "log.jsonl").read_text()
    assert '"calibrate_teacher": true' in log and '"calibrate_guidance": [7.5, 2.0]' in log
    assert '"teacher_empty"' not in log
    seen.clear()
    train.main(["-o", str(tmp_path / "anchored"), "--init-from", str(straight / "model"), "--unet-steps", "2",
                "--calibrate-guidance", "7.5", "--calibrate-to", "2", "--calibrate-teacher", "--teacher-empty",
                "--drop", "0.5", "--ema-decay", "0.5", *SMALL])
    assert seen == [True, True]
    assert '"teacher_empty": true' in (tmp_path / "anchored" / "log.jsonl").read_text()
    for bad in (["--calibrate-teacher"], ["--calibrate-guidance", "7.5", "--calibrate-teacher"],
                ["--calibrate-guidance", "7.5", "--teacher-empty"]):
        with pytest.raises(SystemExit):
            train.main(["-o", str(tmp_path / "bad"), *bad, *SMALL])
