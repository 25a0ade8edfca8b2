"""Method families as registries (inverse problems, fast samplers, RCFG modes), the old public names
derived from them, the stream's counter, and the one sample-shape helper."""
import pytest
import torch

from straightflow.control import inverse
from straightflow.control.operators import make_operator
from straightflow.images import fast
from straightflow.models import MLP, UNet, sample_shape
from straightflow.registry import UnknownNameError
from straightflow.solvers.base import CountedVelocity
from straightflow.solvers.rk import EULER, HEUN, MIDPOINT
from straightflow.stream import pipeline


def test_inverse_methods_registry():
    assert inverse.METHODS == ("flowchef", "dps", "flair", "pmrf") and isinstance(inverse.METHODS, tuple)
    assert inverse.available() == list(inverse.METHODS)
    assert sorted(inverse.INVERSE_METHODS.names()) == sorted(inverse.METHODS)
    with pytest.raises(UnknownNameError, match="valid names: dps, flair, flowchef, pmrf"):
        inverse.INVERSE_METHODS.get("ddrm")
    op = make_operator("inpaint_box", (1, 8, 8))
    y = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UnknownNameError, match="unknown restoration method 'ddrm'; valid: flowchef, dps, flair, pmrf"):
        inverse.restore("ddrm", lambda x, t: x, op, y)
    with pytest.raises(ValueError, match="fitted PMRF"):
        inverse.restore("pmrf", lambda x, t: x, op, y, memory=False)
    zero = lambda x, t, **k: torch.zeros_like(x)  # noqa: E731
    r = inverse.restore("FlowChef", zero, op, y, memory=False, steps=3)
    assert r.info["method"] == "flowchef" and r.nfe == 3


def test_inverse_methods_count_through_the_shared_counter():
    class Guided:  # a model computing two rows per sample is charged two evaluations
        evals_per_call = 2

        def __call__(self, x, t):
            return -x

    op = make_operator("inpaint_box", (1, 8, 8))
    y = torch.zeros(2, 1, 8, 8)
    for method, kw in (("flowchef", {}), ("dps", {}), ("flair", {"data_steps": 0})):
        assert inverse.restore(method, Guided(), op, y, memory=False, steps=4, **kw).nfe == 8
        assert inverse.restore(method, lambda x, t: -x, op, y, memory=False, steps=4, **kw).nfe == 4


def test_fast_samplers_registry():
    assert fast.FAST_SOLVERS == {"euler": 1, "midpoint": 2, "heun": 2} and isinstance(fast.FAST_SOLVERS, dict)
    assert list(fast.FAST_SOLVERS) == fast.available() == ["euler", "midpoint", "heun"]
    assert [fast.FAST_SAMPLERS.get(n).tableau for n in ("euler", "midpoint", "heun")] == [EULER, MIDPOINT, HEUN]
    with pytest.raises(UnknownNameError, match="valid names: euler, heun, midpoint"):
        fast.FAST_SAMPLERS.get("rk4")
    with pytest.raises(UnknownNameError, match="fast sampling supports euler, midpoint, heun; got 'rk4'"):
        fast.fast_solve(lambda x, t: x, torch.zeros(1, 2), torch.linspace(0, 1, 3), "rk4")


def test_fast_solve_stays_on_tensors():
    """The loop sees 0-d tensor times (never Python floats), so nothing syncs with the host."""
    seen = []

    def model(x, t):
        seen.append(t)
        return -x

    ts = torch.tensor([0.0, 0.25, 1.0])
    out = fast.fast_solve(model, torch.ones(3, 2), ts, "heun")
    assert len(seen) == 4 and all(torch.is_tensor(t) and t.shape == (3,) for t in seen)
    ref = torch.ones(3, 2)
    for i in range(2):
        h = float(ts[i + 1] - ts[i])
        ref = ref + 0.5 * h * (-ref - (ref - h * ref))
    torch.testing.assert_close(out, ref)


def test_rcfg_registry():
    assert pipeline.RCFG_MODES == ("none", "self", "initialize", "full") and isinstance(pipeline.RCFG_MODES, tuple)
    assert pipeline.available() == list(pipeline.RCFG_MODES)
    aliases = {"self-negative": "self", "self_negative": "self", "onetime": "initialize", "one-time": "initialize",
               "onetime-negative": "initialize", "cfg": "full", "FULL": "full"}
    for name, canon in aliases.items():
        assert pipeline.canonical_rcfg(name) == canon
    assert [pipeline.rows_per_call(m, 4) for m in ("none", "self", "onetime", "cfg")] == [4, 4, 5, 8]
    with pytest.raises(UnknownNameError, match="unknown rcfg mode 'half'; valid names: full, initialize, none, self"):
        pipeline.canonical_rcfg("half")
    with pytest.raises(UnknownNameError, match="unknown rcfg mode"):
        pipeline.rows_per_call("half", 2)


def test_counting_model_is_the_shared_counter():
    class M:
        num_classes = 7

        def __call__(self, x, t, y=None):
            return x + y.reshape(-1, 1).to(x.dtype)

    c = pipeline.CountingModel(M())
    assert isinstance(c, CountedVelocity) and c.num_classes == 7  # attributes forwarded
    x = torch.zeros(3, 2)
    out = c(x, torch.full((3,), 0.5), y=torch.tensor([1, 2, 3]))
    c(x[:1], torch.full((1,), 0.5), y=torch.tensor([1]))
    assert torch.equal(out[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert (c.calls, c.rows, c.batch_sizes) == (2, 4, [3, 1])
    c.reset()
    assert (c.calls, c.rows, c.batch_sizes, c.nfe) == (0, 0, [], 0)
    with pytest.raises(AttributeError):
        c.no_such_attribute


def test_sample_shape():
    assert sample_shape(UNet(1, 8, 8, (1, 2))) == (1, 8, 8)
    assert sample_shape(MLP(dim=3)) == (3,)
    assert sample_shape(object(), (2, 5)) == (2, 5)
    assert sample_shape(object(), required=False) is None
    with pytest.raises(ValueError, match="pass shape="):
        sample_shape(object())
    with pytest.raises(ValueError, match="positive sizes"):
        sample_shape(object(), (0, 2))


def test_guidance_schedules_and_rewards_are_registries():
    """Guidance schedules and reward kinds are Registries: the old tuples are derived from them and an
    unknown name gets the standard one-line error with the valid names."""
    from straightflow.control import guidance, rewards
    from straightflow.registry import Registry

    assert isinstance(guidance.GUIDANCE_SCHEDULES, Registry) and isinstance(rewards.REWARDS, Registry)
    assert guidance.SCHEDULES == ("constant", "linear", "cosine")
    assert sorted(guidance.SCHEDULES) == guidance.GUIDANCE_SCHEDULES.names()
    assert rewards.REWARD_KINDS == ("class", "region")
    assert sorted(rewards.REWARD_KINDS) == rewards.REWARDS.names()
    with pytest.raises(UnknownNameError,
                       match="^unknown guidance schedule 'exp'; valid names: constant, cosine, linear$"):
        guidance.GuidanceSchedule("exp")
    assert guidance.GuidanceSchedule("Cosine").kind == "cosine"
    with pytest.raises(UnknownNameError, match="^unknown reward 'pixel'; valid names: class, region \\(e.g. 'class:3'"):
        rewards.parse_reward("pixel:3")
    assert isinstance(rewards.parse_reward("region:disc:0,0,1"), rewards.RegionReward)


def test_list_shows_every_registry(capsys):
    """`straightflow list` prints the alignment methods and the registries above, from the registries."""
    from straightflow import align
    from straightflow.cli import main
    from straightflow.cli.listing import families

    fam = families()
    assert fam["alignment methods"] == align.available()
    assert {"adjoint_matching", "dpo", "grpo", "reinflow", "rwr"} <= set(fam["alignment methods"])
    assert fam["guidance schedules"] == ["constant", "cosine", "linear"]
    assert fam["rewards"] == ["class", "region"]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert f"alignment methods: {', '.join(align.available())}\n" in out
