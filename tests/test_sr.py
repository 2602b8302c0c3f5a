"""Super-resolution stages and the cascade: shapes, crops, noise augmentation, chaining, bad input.

One module-scoped fixture trains three tiny workdirs for one step each (a 16x16 base,
an SR stage 16 -> 32, and a 1024-style stage 32 -> 64 trained on 32x32 crops), which the
tests then sample from.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediff_jax import sr, training
from ediff_jax.cascade import read_stages, run_cascade
from ediff_jax.config_utils import load_config
from ediff_jax.sampling import Sampler
from ediff_jax.generation import generate, sample_from_workdir
from ediff_jax.spec import CanvasSpec, GenerationSpec, PaintSpec, SRStage, StageSettings

REPO = Path(__file__).resolve().parents[1]


def _tiny(spec: str, data_dir: str):
    c = load_config(str(REPO / spec))
    c.data.data_dir = data_dir
    c.train.num_steps = 1
    c.train.batch_size = 8
    c.sample.steps = 2
    c.sample.num_per_prompt = 1
    c.sample.prompts = ("a red circle",)
    return c


@pytest.fixture(scope="module")
def configs(shapes_data_dir):
    base = _tiny("configs/base64.py:size=tiny", shapes_data_dir)
    base.data.image_size = 16
    base.sample.prompts = ()  # no grid: the cascade test samples it
    return {"base": base, "sr32": _tiny("configs/sr.py:stage=256,size=tiny", shapes_data_dir),
            "sr64": _tiny("configs/sr.py:stage=1024,size=tiny", shapes_data_dir)}


class TrainedWorkdirs(dict):
    """Workdirs trained on first use (one step each), so fast tests pay only for what they use."""

    def __init__(self, configs: dict, root: Path):
        super().__init__()
        self.configs, self.root = configs, root

    def __missing__(self, name: str) -> Path:
        self[name] = self.root / name
        training.train_and_evaluate(self.configs[name], self[name])
        return self[name]


@pytest.fixture(scope="module")
def workdirs(configs, tmp_path_factory):
    return TrainedWorkdirs(configs, tmp_path_factory.mktemp("cascade"))


@pytest.fixture(scope="module")
def config_only_workdirs(configs, tmp_path_factory):
    """Workdirs holding only config.json: enough for the checks made before any checkpoint is read."""
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, config in configs.items():
        out[name] = root / name
        out[name].mkdir()
        (out[name] / "config.json").write_text(config.to_json_best_effort())
    return out


def test_aug_level_zero_leaves_lowres_unchanged():
    """Noise-conditioning augmentation: level 0 is the identity; level s adds noise of std s."""
    lowres = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 3), minval=-1, maxval=1)
    same = sr.noise_lowres(jax.random.PRNGKey(1), lowres, jnp.zeros((4,)))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(lowres))
    noisy = sr.noise_lowres(jax.random.PRNGKey(1), lowres, jnp.asarray([0.0, 0.1, 0.5, 1.0]))
    stds = np.std(np.asarray(noisy - lowres).reshape(4, -1), axis=1)
    np.testing.assert_allclose(stds, [0.0, 0.1, 0.5, 1.0], rtol=0.15, atol=1e-7)
    augmented, level = sr.augment_lowres(jax.random.PRNGKey(2), lowres, 0.3)
    assert level.shape == (4,) and np.all((np.asarray(level) >= 0) & (np.asarray(level) <= 0.3))


def test_residual_denoiser_is_the_edm_loss_on_residuals():
    """D'(x) = up + D(x - up) with up = bicubic(lowres): zero D gives bicubic upsampling, and the EDM
    loss of D' on images equals the EDM loss of D on the residuals images - up (closed form)."""
    from ediff_jax import edm

    rng = np.random.default_rng(0)
    lowres = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 3)), jnp.float32)
    images = jnp.asarray(rng.uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
    up = jax.image.resize(lowres, (3, 16, 16, 3), method="cubic")
    zero = sr.residual_denoiser(lambda x, sigma: jnp.zeros_like(x), lowres)
    np.testing.assert_allclose(np.asarray(zero(images, jnp.ones((3,)))), np.asarray(up), atol=1e-6)
    denoise = lambda x, sigma: 0.7 * x + 0.1 * jnp.sin(3 * x)  # noqa: E731  (any nonlinear D)
    sigma = jnp.asarray([0.05, 0.8, 12.0])
    noise = jnp.asarray(rng.normal(size=images.shape), jnp.float32)
    ours = edm.edm_loss(sr.residual_denoiser(denoise, lowres), images, sigma, noise, 0.2)
    direct = edm.edm_loss(denoise, images - up, sigma, noise, 0.2)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(direct), rtol=1e-5)


def test_residual_stage_reads_its_network_as_a_residual(configs):
    """make_model_fn of a residual stage = bicubic(lowres) + the plain stage's D at x - up, same weights;
    sr.residual on a base model is refused at the boundary."""
    from ediff_jax.sampling import make_model_fn

    plain_config = configs["sr32"].copy_and_resolve_references()
    residual_config = plain_config.copy_and_resolve_references()
    residual_config.sr.residual = True
    plain, residual = training.build_experiment(plain_config), training.build_experiment(residual_config)
    assert residual.model.lowres_residual and not plain.model.lowres_residual
    assert training.model_meta(residual_config)["sr"]["residual"] and "residual" not in training.model_meta(plain_config)["sr"]
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), plain.example_cond(2))
    cond["lowres"] = jax.random.uniform(jax.random.PRNGKey(1), cond["lowres"].shape, minval=-1, maxval=1)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    params = plain.model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)), cond)["params"]
    sigma = jnp.asarray([0.3, 3.0])
    up = jax.image.resize(cond["lowres"], x.shape, method="cubic")
    ours = make_model_fn(residual.model, params, 0.5)(x, sigma, cond)
    expected = up + make_model_fn(plain.model, params, 0.5)(x - up, sigma, cond)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(expected), atol=1e-5)
    base = configs["base"].copy_and_resolve_references()
    base.sr.residual = True
    with pytest.raises(ValueError, match="sr.residual=True needs an SR stage"):
        training.build_experiment(base)


def test_residual_stage_starts_at_bicubic_plus_noise(configs):
    """A residual stage's sampler starts at bicubic(lowres) + sigma_max * noise (its residual prior
    N(0, sigma^2)), so one Euler step from sigma is up + D(sigma * n; sigma) -- checked against
    make_model_fn directly for the whole-image Sampler and a one-tile MultiDiffusion sampler."""
    from ediff_jax.multidiffusion import MultiDiffusionSampler
    from ediff_jax.sampling import make_model_fn

    lowres = jax.random.uniform(jax.random.PRNGKey(3), (2, 4, 4, 3), minval=-1, maxval=1)
    up = sr.upsample_lowres(lowres, (2, 16, 16, 3))
    plain = sr.initial_state(jax.random.PRNGKey(4), (2, 16, 16, 3), 2.0, lowres, False)
    shifted = sr.initial_state(jax.random.PRNGKey(4), (2, 16, 16, 3), 2.0, lowres, True)
    np.testing.assert_allclose(np.asarray(shifted - plain), np.asarray(up), atol=1e-6)
    np.testing.assert_allclose(np.asarray(plain), 2.0 * np.asarray(jax.random.normal(jax.random.PRNGKey(4), (2, 16, 16, 3))))

    config = configs["sr32"].copy_and_resolve_references()
    config.sr.residual = True
    exp, plain = training.build_experiment(config), training.build_experiment(configs["sr32"])
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), exp.example_cond(1))
    params = exp.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)), cond)["params"]
    # The output conv starts at zero; perturb every weight so the network, its text and
    # low-res inputs all matter, not only D's skip term.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(9), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    low_u8 = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    sigma, kwargs = 1.0, dict(guidance=1.0, seed=7, lowres=low_u8, aug_level=0.0)
    whole = Sampler(exp.model, exp.encoders, image_size=32, steps=1, sampler="euler", sigma_max=sigma,
                    sigma_data=0.5, lowres_factor=2)(params, ["a red circle"], **kwargs)
    tiled = MultiDiffusionSampler(exp.model, exp.encoders, image_size=32, height=32, width=32, steps=1,
                                  sampler="euler", sigma_max=sigma, sigma_data=0.5,
                                  lowres_factor=2)(params, ["a red circle"], **kwargs)
    low = jnp.asarray(sr.lowres_to_model(low_u8))
    text = exp.encoders.encode(exp.encoders.params, exp.encoders.tokenize(["a red circle"]))
    full_cond = {**text, "lowres": low, "aug_level": jnp.zeros((1,))}
    noise = sigma * jax.random.normal(jax.random.PRNGKey(7), (1, 32, 32, 3))
    up = sr.upsample_lowres(low, (1, 32, 32, 3))
    expected = np.asarray(up + make_model_fn(plain.model, params, 0.5)(noise, jnp.full((1,), sigma), full_cond))
    expected = np.clip(np.round((expected + 1) * 127.5), 0, 255)
    for out in (whole, tiled):
        assert np.abs(out.astype(float) - expected).max() <= 1.0


@pytest.mark.parametrize("name, out, low, train", [("sr32", 32, 16, 32), ("sr64", 64, 32, 32)])
def test_stage_shapes(configs, name, out, low, train):
    """Each stage maps (x [B, out, out, 3], lowres [B, low, low, 3]) to [B, out, out, 3]; the
    1024-style stage has no self-attention and its training shape is the crop."""
    exp = training.build_experiment(configs[name])
    assert exp.is_sr and exp.train_shape == (train, train, 3) and exp.image_shape == (out, out, 3)
    cond = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), exp.example_cond(2))
    assert cond["lowres"].shape == (2, train // (out // low), train // (out // low), 3)
    params = jax.eval_shape(lambda: exp.model.init(jax.random.PRNGKey(0), jnp.zeros((2, train, train, 3)),
                                                   jnp.zeros((2,)), cond))["params"]
    full_cond = {**cond, "lowres": jnp.zeros((2, low, low, 3))}
    y = jax.eval_shape(lambda p: exp.model.apply({"params": p}, jnp.zeros((2, out, out, 3)), jnp.zeros((2,)),
                                                 full_cond), params)
    assert y.shape == (2, out, out, 3)
    names = "/".join(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params))
    assert "aug_mlp_0" in names
    if name == "sr64":
        assert "self_attn" not in names and "cross_attn" in names


@pytest.mark.slow
def test_crop_trained_stage_runs_on_full_size_input(workdirs, configs):
    """The 1024-style stage, trained on 32x32 crops, samples whole 64x64 images from 32x32 inputs."""
    from ediff_jax.cascade import Stage, load_stages

    from ediff_jax.workdirs import read_workdir_config

    stage = Stage(workdirs["sr64"], read_workdir_config(workdirs["sr64"]))
    load_stages([stage])
    sampler = Sampler(stage.exp.model, stage.exp.encoders, image_size=64, steps=2, lowres_factor=2)
    lowres = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    images = sampler(stage.params, ["a red circle", "a blue square"], guidance=1.0, lowres=lowres)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert (workdirs["sr64"] / "samples" / "final.png").exists()  # the train loop's validation grid
    with pytest.raises(ValueError, match=r"needs low-res images of shape \(2, 32, 32, 3\)"):
        sampler(stage.params, ["a", "b"], lowres=lowres[:, :16, :16])
    with pytest.raises(ValueError, match="pass `lowres`"):
        sampler(stage.params, ["a", "b"])


def cascade_spec(stages, settings, num=1, **fields) -> GenerationSpec:
    """The spec of a cascade over loaded `stages` with per-stage `settings` (base first)."""
    return GenerationSpec(workdir=stages[0].workdir, prompts=("a red circle",), num=num, base=settings[0],
                          sr_stages=tuple(SRStage(st.workdir, s) for st, s in zip(stages[1:], settings[1:])), **fields)


@pytest.mark.slow
def test_cascade_end_to_end(workdirs, tmp_path):
    """text -> 16 -> 32 -> 64: each stage's PNGs are written at its resolution; a fixed seed repeats."""
    out = tmp_path / "cascade"
    settings = [StageSettings(steps=2), StageSettings(steps=2, aug_level=0.0), StageSettings(steps=2, guidance=1.5)]
    spec = GenerationSpec(workdir=workdirs["base"], prompts=("a red circle",), num=2, base=settings[0],
                          sr_stages=(SRStage(workdirs["sr32"], settings[1]), SRStage(workdirs["sr64"], settings[2])))
    images = generate(spec, out=out)
    assert [im.shape for im in images] == [(2, 16, 16, 3), (2, 32, 32, 3), (2, 64, 64, 3)]
    for k, size in enumerate((16, 32, 64)):
        assert (out / f"stage{k}_{size}x{size}" / "grid.png").exists()
        assert (out / f"stage{k}_{size}x{size}" / "00_01.png").exists()
    # the SR stages depend on their input: a different base seed changes the final images
    stages = read_stages(workdirs["base"], [workdirs["sr32"]])
    from ediff_jax.cascade import load_stages

    load_stages(stages)
    a = run_cascade(stages, cascade_spec(stages, [StageSettings(steps=2), StageSettings(steps=2)], num=2))
    b = run_cascade(stages, cascade_spec(stages, [StageSettings(steps=2), StageSettings(steps=2)], num=2))
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.slow
def test_panorama_through_sr_stage_tiles_and_full(workdirs):
    """A 16x64 base panorama becomes 32x128 through the SR stage, both fully convolutionally and
    as MultiDiffusion tiles, and the two agree in layout (same low-res input, same shapes)."""
    from ediff_jax.cascade import load_stages

    stages = read_stages(workdirs["base"], [workdirs["sr32"]])
    load_stages(stages)
    settings = [StageSettings(steps=2), StageSettings(steps=2, aug_level=0.0)]
    full = run_cascade(stages, cascade_spec(stages, settings, canvas=CanvasSpec(height=16, width=64)))
    tiles = run_cascade(stages, cascade_spec(stages, settings, canvas=CanvasSpec(height=16, width=64, stride=4),
                                             sr_mode="tiles"))
    assert full[0].shape == (1, 16, 64, 3) and full[1].shape == (1, 32, 128, 3)
    np.testing.assert_array_equal(full[0], tiles[0])  # the same base panorama
    assert tiles[1].shape == (1, 32, 128, 3)


@pytest.mark.slow
def test_painted_region_panorama_through_sr_tiles(workdirs):
    """Paint-with-words and a region prompt on a panorama, carried through an SR stage as tiles
    (issue #17): at w' = 0 every stage equals the unpainted cascade exactly, and w' > 0 changes
    the base panorama (its only painted phrase is the background prompt's)."""
    from ediff_jax.cascade import load_stages

    stages = read_stages(workdirs["base"], [workdirs["sr32"]])
    load_stages(stages)
    rng = np.random.default_rng(0)
    for stage in stages:  # random weights: the one-step models saturate every pixel, hiding any change
        stage.params = jax.tree_util.tree_map_with_path(
            lambda path, a: (float(path[-1].key == "scale") + 0.2 * rng.standard_normal(a.shape)).astype(a.dtype),
            stage.params)
    settings = [StageSettings(steps=2), StageSettings(steps=2, aug_level=0.0)]
    right = np.zeros((16, 64), np.float32)
    right[:, 32:] = 1.0
    canvas = CanvasSpec(height=16, width=64, stride=4, regions=(("a blue square", right),))
    run = lambda paint=None: run_cascade(stages, cascade_spec(stages, settings, canvas=canvas, sr_mode="tiles",
                                                              paint=paint))
    plain = run()
    zero = run(PaintSpec({"red circle": 1.0 - right}, weight=0.0))
    strong = run(PaintSpec({"red circle": 1.0 - right}, weight=3.0))
    assert [im.shape for im in strong] == [(1, 16, 64, 3), (1, 32, 128, 3)]
    for a, b in zip(zero, plain):
        np.testing.assert_array_equal(a, b)
    assert np.abs(strong[0].astype(int) - plain[0]).max() > 0
    # The SR stage itself is painted: its tiles, on the same low-res panorama, change with w'.
    from ediff_jax.multidiffusion import MultiDiffusionSampler
    from ediff_jax.multidiffusion.sampler import canvas_paint_cond

    stage = stages[1]
    sampler = MultiDiffusionSampler(stage.exp.model, stage.exp.encoders, image_size=stage.tile_size, height=32,
                                    width=128, stride=4 * stage.factor, lowres_factor=stage.factor, steps=2,
                                    sampler=str(stage.config.sample.sampler),
                                    sigma_data=float(stage.config.edm.sigma_data), boundaries=stage.exp.boundaries)
    up = np.repeat(1.0 - right, 2, axis=0).repeat(2, axis=1)
    sr_run = lambda w: sampler(stage.params, ["a red circle"], guidance=float(stage.config.sample.guidance), seed=1,
                               lowres=plain[0], aug_level=0.0, extra_cond=canvas_paint_cond(
                                   stage.exp.encoders, ["a red circle"], [], {"red circle": up}, (32, 128), w))
    np.testing.assert_array_equal(sr_run(0.0), plain[1])  # the cascade's own SR call, reproduced
    assert np.abs(sr_run(3.0).astype(int) - plain[1]).max() > 0


@pytest.mark.slow
def test_cli_runs_every_feature_at_once(workdirs, tmp_path):
    """One command: a painted panorama with a region prompt under SpotDiffusion's shifted windows, through an SR
    stage as (shifted) tiles, encoder choice included; the CLI builds one spec and every stage writes its images
    and its painting."""
    from ediff_jax import sample
    from ediff_jax.images import save_png

    right = np.zeros((16, 48), np.uint8)
    right[:, 24:] = 255
    save_png(np.repeat(right[..., None], 3, -1), tmp_path / "right.png")
    save_png(np.repeat(255 - right[..., None], 3, -1), tmp_path / "left.png")
    sample.FLAGS.unparse_flags()
    try:
        sample.parse_flags(["sample", f"--workdir={workdirs['base']}", "--prompt=a red circle", "--num=1",
                            "--steps=2", "--width=48", "--canvas_strategy=shifted",
                            f"--region=a blue square={tmp_path / 'right.png'}",
                            f"--paint=red circle={tmp_path / 'left.png'}", "--pww_weight=1", "--bootstrap=0.5",
                            f"--sr_workdir={workdirs['sr32']}", "--sr_steps=2", "--aug_level=0", "--sr_mode=tiles",
                            "--nouse_clip", f"--out={tmp_path / 'out'}"])
        sample.check_flags()
        sample.run()
    finally:
        sample.FLAGS.unparse_flags()
    for folder, (h, w) in (("stage0_16x48", (16, 48)), ("stage1_32x96", (32, 96))):
        for name in ("grid.png", "00_00.png", "masks.png", "paint.txt", "prompts.txt"):
            assert (tmp_path / "out" / folder / name).exists(), (folder, name)
        assert "region: a blue square" in (tmp_path / "out" / folder / "prompts.txt").read_text()


def test_chain_errors(config_only_workdirs, configs):
    """Stages that do not chain, an SR stage used as a base, and a base used as an SR stage."""
    workdirs = config_only_workdirs
    with pytest.raises(ValueError, match="outputs 16x16 but .* expects 32x32"):
        read_stages(workdirs["base"], [workdirs["sr64"]])
    with pytest.raises(ValueError, match="must be a base"):
        read_stages(workdirs["sr32"], [])
    with pytest.raises(ValueError, match="is a base model, not an SR stage"):
        read_stages(workdirs["base"], [workdirs["base"]])
    with pytest.raises(ValueError, match="holds an SR stage"):
        sample_from_workdir(workdirs["sr32"], ["a red circle"])
    with pytest.raises(ValueError, match="lowres_size=12 must divide"):
        bad = configs["sr32"].copy_and_resolve_references()
        bad.sr.lowres_size = 12
        training.build_experiment(bad)
    with pytest.raises(ValueError, match="crop_size=21 must be"):
        bad = configs["sr64"].copy_and_resolve_references()
        bad.sr.crop_size = 21
        training.build_experiment(bad)


@pytest.mark.slow
def test_sr_checkpoint_refused_under_base_config(workdirs, configs):
    """Resuming an SR workdir with a base config (or the reverse) fails before anything is written."""
    from ediff_jax.checkpoints import CheckpointMismatchError

    base = configs["base"].copy_and_resolve_references()
    with pytest.raises((CheckpointMismatchError, ValueError)):
        training.train_and_evaluate(base, workdirs["sr32"])


def test_two_expert_sr_stage_traces(shapes_data_dir):
    """A 2-expert SR stage goes through the expert machinery: the branched train step traces
    (shapes only, nothing compiled) with stacked params and the low-res input split per expert."""
    c = _tiny("configs/sr.py:stage=256,size=tiny,experts=2", shapes_data_dir)
    c.train.num_steps, c.experts.phase_steps = 2, (1, 1)
    exp = training.build_experiment(c)
    abstract, _ = training.state_shardings(exp, 1)
    assert jax.tree.leaves(abstract.params)[0].shape[0] == 2
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
             "lowres": jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32),
             **jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.encoders.tokenize(["a"] * 8))}
    new_state, metrics = jax.eval_shape(training.make_train_step(exp, 1), abstract, exp.encoders.params, batch)
    assert metrics["loss/expert_1"].shape == () and jax.tree.leaves(new_state.params)[0].shape[0] == 2


def test_crop_trained_stage_tiles_at_its_crop(config_only_workdirs):
    """A stage trained on crops is tiled at the crop (GroupNorm sees training-sized windows);
    others at their image size."""
    from ediff_jax.cascade import Stage
    from ediff_jax.workdirs import read_workdir_config

    sizes = {name: Stage(path, read_workdir_config(path)).tile_size for name, path in config_only_workdirs.items()}
    assert sizes == {"base": 16, "sr32": 32, "sr64": 32}
