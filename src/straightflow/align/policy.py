"""Flow policies: the condition is an observation, the sample an action (ReinFlow, Zhang et al. 2025).

A flow policy is a velocity model ``v(a_t, t, obs)`` over actions (:class:`ObsMLP`); acting means
integrating ``K`` Euler steps from ``a_0 ~ N(0, I)`` (K = 1-4 "denoising steps") and clipping to the
action box. This module

1. **behaviour-clones** one from a scripted expert on a small ``gymnasium`` task
   (:func:`expert_data`, :func:`behaviour_clone`: plain flow matching on ``(obs, expert action)`` pairs
   collected by running the expert with exploration noise; Pendulum-v1 by default, its expert an
   energy-pumping swing-up with a PD stabiliser, deliberately untuned so there is room to improve);
2. **fine-tunes it online with ReinFlow** (:class:`ReinFlowPPO`): the chain
   ``a_{k+1} = a_k + h v_theta(a_k, t_k, obs) + sigma_phi(t_k, obs) eps`` (learnable noise
   network, :class:`~.reinflow.NoiseNet`) is a Markov process with the exact likelihood
   ``log pi(a_{0..K} | obs) = sum_k log N(a_{k+1}; a_k + h v_theta, sigma_phi^2)``, the action's
   log-probability in PPO (Schulman et al. 2017) with a learned critic ``V(obs)`` and GAE(gamma, lambda)::

       L = - E min(rho A, clip(rho, 1 - eps, 1 + eps) A) + c_v E (V(obs) - R)^2
           - c_H E sum_k log sigma_phi + reg E sum_k || h (v_theta - v_ref) ||^2 / (2 sigma_phi^2),

   ``rho = pi_theta / pi_old`` of the whole chain, ``A`` normalised per minibatch. One rollout
   (``n_envs`` episodes of ``horizon`` steps, env seeds from the trainer's generator) feeds
   ``epochs`` passes of minibatch updates, one per trainer step; the rollout lives in buffers of the
   trained module, so the trainer's state file holds it and a killed run resumes exactly.
3. **evaluates** with the injected noise off (:func:`evaluate`): mean return over fixed seeds.

The policy network is :class:`straightflow.models.ObsMLP` (registered as ``"obs_mlp"``), so
``sf.load`` rebuilds a policy run like any other.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Dataset
from ..flow import Flow
from ..models import ObsMLP
from .base import AlignObjective, AlignResult, AlignTrainer, _unwrap, export_policy, policy_config
from .reinflow import NoiseNet
from .sde import gaussian_kl, gaussian_logp

__all__ = ["ObsMLP", "ValueNet", "pendulum_expert", "expert_data", "FlowPolicyBC", "behaviour_clone", "act",
           "evaluate", "ReinFlowPPO", "reinflow_finetune", "ENVS", "make_env"]


def _gym():
    try:
        import gymnasium
    except ImportError as e:  # pragma: no cover
        raise ImportError("flow policies need gymnasium: pip install 'straightflow[align]' (or pip install gymnasium)") from e
    return gymnasium


# ----------------------------------------------------------------------------- networks
class ValueNet(nn.Module):
    """Critic ``V(obs)``: an MLP, ``forward(obs, t=None) -> (B,)``."""

    def __init__(self, obs_dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.config = {"name": "value_net", "obs_dim": obs_dim, "hidden": hidden}
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Any = None, **_: Any) -> Tensor:
        return self.net(x)[:, 0]


class _PolicyNoise(nn.Module):
    """NoiseNet conditioned on the observation, called as a head ``(a, t, obs=...)``."""

    def __init__(self, net: NoiseNet) -> None:
        super().__init__()
        self.net = net
        self.config = net.config

    def forward(self, x: Tensor, t: Tensor, obs: Optional[Tensor] = None, **_: Any) -> Tensor:
        return self.net(x, t, obs=obs)


# ----------------------------------------------------------------------------- environments + expert
def pendulum_expert(obs: np.ndarray, ke: float = 0.015, kp: float = 7.0, kd: float = 1.0, top: float = 0.9) -> np.ndarray:
    """Scripted Pendulum-v1 expert on observations (B, 3) = (cos th, sin th, th_dot) -> torques (B, 1).

    Energy pumping ``u = ke (E_top - E) th_dot`` with ``E = th_dot^2 / 2 + 15 cos th`` (the env's
    ``th_ddot = 15 sin th + 3 u``), a PD controller ``u = -(kp th + kd th_dot)`` when ``cos th > top``;
    clipped to [-2, 2]. The gains are deliberately mild (slow swing-up): mean return about -360."""
    obs = np.atleast_2d(obs)
    c, s, w = obs[:, 0], obs[:, 1], obs[:, 2]
    th = np.arctan2(s, c)
    energy = 0.5 * w * w + 15.0 * c
    u = np.where(c > top, -(kp * th + kd * w), ke * (15.0 - energy) * w)
    return np.clip(u, -2.0, 2.0)[:, None].astype(np.float32)


ENVS: Dict[str, Dict[str, Any]] = {
    "Pendulum-v1": {"expert": pendulum_expert, "max_action": 2.0},
}


def make_env(env_id: str):
    if env_id not in ENVS:
        raise ValueError(f"unknown flow-policy environment {env_id!r}; valid: {', '.join(ENVS)} (a scripted expert "
                         "is needed for behaviour cloning)")
    return _gym().make(env_id)


def expert_data(env_id: str = "Pendulum-v1", episodes: int = 30, noise: float = 0.5, seed: int = 0
                ) -> Tuple[Tensor, Tensor, float]:
    """``(obs (N, O), actions (N, A) in [-1, 1], mean expert return)``: the expert's clean action at every
    state visited while executing it with Gaussian exploration noise ``noise * max_action`` (DART-style
    coverage). The return is of the noisy execution."""
    spec = ENVS.get(env_id) or make_env(env_id)
    env = make_env(env_id)
    rng = np.random.default_rng(seed)
    mx = float(spec["max_action"])
    obs_l, act_l, rets = [], [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=int(seed) * 100003 + ep)
        ret, done = 0.0, False
        while not done:
            a = spec["expert"](obs[None])[0]
            obs_l.append(np.asarray(obs, dtype=np.float32))
            act_l.append(a / mx)
            exe = np.clip(a + noise * mx * rng.standard_normal(a.shape), -mx, mx).astype(np.float32)
            obs, r, term, trunc, _ = env.step(exe)
            ret += float(r)
            done = term or trunc
        rets.append(ret)
    env.close()
    return torch.from_numpy(np.stack(obs_l)), torch.from_numpy(np.stack(act_l)).float(), float(np.mean(rets))


# ----------------------------------------------------------------------------- behaviour cloning
class FlowPolicyBC:
    """Flow-matching behaviour cloning on packed rows ``[action (A), obs (O)]`` (a trainer objective)."""

    name = "flow_policy_bc"

    def __init__(self, model: ObsMLP, time_dist: str = "uniform") -> None:
        self.model = model
        self.flow = Flow(model, time_dist=time_dist)
        self.coupling = self.flow.coupling
        self.action_dim = int(model.action_dim)

    def config(self) -> Dict[str, Any]:
        return {"objective": self.name, **self.flow.config()}

    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        a, obs = x1[:, :self.action_dim], x1[:, self.action_dim:]
        return self.flow.loss(a, cond={"obs": obs}, generator=generator, model=self.model if model is None else model)


def behaviour_clone(env_id: str = "Pendulum-v1", out: Optional[Union[str, Path]] = None, steps: int = 2000,
                    episodes: int = 30, noise: float = 0.5, hidden: int = 128, depth: int = 3, batch_size: int = 256,
                    lr: float = 1e-3, seed: int = 0, progress: bool = True, ema: float = 0.995, device: str = "cpu",
                    log: str = "csv"):
    """Collect expert data and behaviour-clone an :class:`ObsMLP` flow policy (a normal run in ``out``) on
    ``device``. Returns ``(TrainResult, info)`` with the expert's return and the data size in ``info``."""
    from ..train import train

    obs, act_, ret = expert_data(env_id, episodes, noise, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ObsMLP(int(act_.shape[1]), int(obs.shape[1]), hidden=hidden, depth=depth)
    data = Dataset(torch.cat([act_, obs], 1), name=f"{env_id}-expert")
    extra = {"policy": {"env": env_id, "action_dim": int(act_.shape[1]), "obs_dim": int(obs.shape[1]),
                        "max_action": ENVS[env_id]["max_action"], "expert_return": ret, "episodes": episodes,
                        "noise": noise}}
    res = train(FlowPolicyBC(model), data, steps=steps, out=out, batch_size=batch_size, lr=lr, seed=seed,
                progress=progress, ema_decay=ema, warmup=min(100, steps // 10), lr_schedule="cosine",
                extra_config=extra, log_every=min(50, steps), device=device, log=log)
    res.model = res.model.cpu()  # acting steps the environment on the CPU
    res.model.run_config = {"data": {"name": f"{env_id}-actions", "shape": [int(act_.shape[1])]}, **extra}
    return res, {"expert_return": ret, "n": int(obs.shape[0])}


# ----------------------------------------------------------------------------- acting
def _obs_tensor(obs, dtype=torch.float32) -> Tensor:
    return torch.as_tensor(np.asarray(obs), dtype=dtype)


@torch.no_grad()
def act(policy: Callable, obs: Tensor, steps: int, generator: torch.Generator, noise: Optional[Callable] = None,
        return_chain: bool = False, action_dim: Optional[int] = None):
    """Actions in [-1, 1] for observations (B, O): ``steps`` Euler steps from ``a_0 ~ N(0, I)``; with
    ``noise(a, t, obs)`` (ReinFlow's noise network) the injected noise is added (the exploring policy).
    ``return_chain``: also the chain (B, K+1, A)."""
    b = obs.shape[0]
    adim = int(action_dim if action_dim is not None else getattr(policy, "action_dim", None) or policy.sample_shape[0])
    a = torch.randn((b, adim), generator=generator, dtype=obs.dtype)
    chain = [a]
    h = 1.0 / steps
    for k in range(steps):
        tb = torch.full((b,), k * h, dtype=obs.dtype)
        a = a + h * policy(a, tb, obs=obs)
        if noise is not None:
            a = a + noise(a, tb, obs) * torch.randn(a.shape, generator=generator, dtype=a.dtype)
        chain.append(a)
    out = a.clamp(-1, 1)
    return (out, torch.stack(chain, 1)) if return_chain else out


def evaluate(policy: Callable, env_id: str = "Pendulum-v1", episodes: int = 20, steps: int = 4, seed: int = 10_000,
             noise: Optional[Callable] = None) -> Dict[str, float]:
    """Mean (and std) return of ``policy`` over ``episodes`` seeded episodes (env seeds ``seed + i``; action
    noise ``a_0`` from a generator seeded with ``seed``), all episodes stepped in lock-step."""
    mx = float(ENVS[env_id]["max_action"])
    envs = [make_env(env_id) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    g = torch.Generator().manual_seed(seed)
    rets = np.zeros(episodes)
    done = np.zeros(episodes, dtype=bool)
    while not done.all():
        a = act(policy, _obs_tensor(obs), steps, g, noise=noise).numpy() * mx
        for i, e in enumerate(envs):
            if done[i]:
                continue
            o, r, term, trunc, _ = e.step(a[i])
            obs[i], rets[i] = o, rets[i] + r
            done[i] = term or trunc
    for e in envs:
        e.close()
    return {"mean": float(rets.mean()), "std": float(rets.std()), "episodes": episodes}


# ----------------------------------------------------------------------------- ReinFlow + PPO
class ReinFlowPPO(AlignObjective):
    """ReinFlow fine-tuning of a flow policy with PPO (module docstring). ``reg``: KL coefficient to the
    behaviour-cloned chain. One trainer step = one minibatch update; a rollout every
    ``epochs * n_envs * horizon / minibatch`` steps."""

    name = "reinflow_ppo"

    def __init__(self, model: nn.Module, env_id: str = "Pendulum-v1", reg: float = 0.0, reference=None,
                 n_envs: int = 16, horizon: int = 200, denoise_steps: int = 4, epochs: int = 4, minibatch: int = 800,
                 gamma: float = 0.99, lam: float = 0.95, clip: float = 0.2, vf_coef: float = 0.5, ent_coef: float = 0.0,
                 min_std: float = 0.05, max_std: float = 0.3, reward_scale: float = 0.01, hidden: int = 128,
                 init_seed: int = 0) -> None:
        base = getattr(model, "get_base_model", lambda: model)()
        adim, odim = int(base.action_dim), int(base.obs_dim)
        with torch.random.fork_rng(devices=[]):  # the heads' initialisation is part of the run: seed it
            torch.manual_seed(int(init_seed))
            heads = {"noise": _PolicyNoise(NoiseNet(adim, min_std, max_std, hidden=64, cond_dim=odim)),
                     "value": ValueNet(odim, hidden)}
        super().__init__(model, reward=None, reg=reg, reference=reference, heads=heads)
        env = make_env(env_id)  # a clear error for an unknown environment
        limit = getattr(env.spec, "max_episode_steps", None)
        env.close()
        if limit is not None and horizon > limit:
            raise ValueError(f"horizon {horizon} exceeds {env_id}'s episode length {limit}")
        self.env_id = env_id
        self.n_envs, self.horizon, self.K = int(n_envs), int(horizon), int(denoise_steps)
        self.epochs, self.minibatch = int(epochs), int(minibatch)
        n = self.n_envs * self.horizon
        if not 1 <= self.minibatch <= n:
            raise ValueError(f"minibatch must be in [1, n_envs * horizon = {n}], got {minibatch}")
        self.updates_per_rollout = self.epochs * math.ceil(n / self.minibatch)
        self.gamma, self.lam, self.clip = float(gamma), float(lam), float(clip)
        self.vf_coef, self.ent_coef, self.reward_scale = float(vf_coef), float(ent_coef), float(reward_scale)
        self.min_std, self.max_std = float(min_std), float(max_std)
        m = self.model
        m.register_buffer("ro_obs", torch.zeros(n, odim))
        m.register_buffer("ro_chain", torch.zeros(n, self.K + 1, adim))
        m.register_buffer("ro_logp", torch.zeros(n))
        m.register_buffer("ro_adv", torch.zeros(n))
        m.register_buffer("ro_ret", torch.zeros(n))
        m.register_buffer("ro_perm", torch.zeros(n, dtype=torch.long))
        m.register_buffer("ro_updates", torch.zeros((), dtype=torch.long))
        m.register_buffer("ro_stats", torch.zeros(3))  # rollouts done, mean return of the last rollout, of all
        self.max_action = float(ENVS[env_id]["max_action"])
        self._envs: Optional[list] = None

    def settings(self) -> Dict[str, Any]:
        return {"env": self.env_id, "n_envs": self.n_envs, "horizon": self.horizon, "denoise_steps": self.K,
                "epochs": self.epochs, "minibatch": self.minibatch, "gamma": self.gamma, "lam": self.lam,
                "clip": self.clip, "vf_coef": self.vf_coef, "ent_coef": self.ent_coef, "min_std": self.min_std,
                "max_std": self.max_std, "reward_scale": self.reward_scale}

    def probe(self, base: nn.Module, shape: Any = None, cond: Any = None, seed: int = 0) -> None:
        """Check the environment (this method's reward) against the base policy before any training, so
        bad input fails fast: the policy's observation and action sizes match the environment's, and one
        step with the base policy's action (seeded, noise off) gives a finite action and a finite reward.
        ``shape`` and ``cond`` (the sample shape and prompts of :meth:`AlignObjective.probe`) are not
        needed: observations come from the environment."""
        b = getattr(base, "get_base_model", lambda: base)()
        env = make_env(self.env_id)
        try:
            odim, adim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
            if (int(b.obs_dim), int(b.action_dim)) != (odim, adim):
                raise ValueError(f"the policy takes observations of size {b.obs_dim} and gives actions of size "
                                 f"{b.action_dim}; {self.env_id} has observations of size {odim} and actions "
                                 f"of size {adim}")
            obs, _ = env.reset(seed=int(seed))
            a = act(b, _obs_tensor(np.asarray(obs, dtype=np.float32)[None]), self.K,
                    torch.Generator().manual_seed(int(seed)), action_dim=adim)
            if not bool(torch.isfinite(a).all()):
                raise ValueError(f"the base policy gives a non-finite action on {self.env_id} "
                                 "(checked before training)")
            _, r, *_ = env.step(a[0].numpy() * self.max_action)
            if not np.isfinite(r):
                raise ValueError(f"{self.env_id} returned a non-finite reward {r!r} (checked before training)")
        finally:
            env.close()

    # ---------------------------------------------------------------- rollout
    def _chain_logp(self, m: nn.Module, obs: Tensor, chain: Tensor, grad: bool):
        """``(log pi(chain | obs) (B,), kl to the base chain (B,), sum log sigma (B,))``."""
        h = 1.0 / self.K
        logp = obs.new_zeros(obs.shape[0])
        kl = obs.new_zeros(obs.shape[0])
        ent = obs.new_zeros(obs.shape[0])
        for k in range(self.K):
            a = chain[:, k]
            tb = torch.full((a.shape[0],), k * h, dtype=a.dtype)
            v = self.velocity(m, a, tb, {"obs": obs})
            std = m(a, tb, part="noise", obs=obs)
            mean = a + h * v
            logp = logp + gaussian_logp(chain[:, k + 1], mean, std)
            ent = ent + torch.log(std).reshape(a.shape[0], -1).sum(1)
            if grad and self.reg > 0:
                vr = self.ref_velocity(m, a, tb, {"obs": obs})
                kl = kl + gaussian_kl(mean, a + h * vr, std)
        return logp, kl, ent

    @torch.no_grad()
    def collect(self, m: nn.Module, generator: torch.Generator) -> None:
        E, T = self.n_envs, self.horizon
        if self._envs is None:
            self._envs = [make_env(self.env_id) for _ in range(E)]
        seeds = torch.randint(0, 2 ** 31 - 1, (E,), generator=generator).tolist()
        obs = np.stack([e.reset(seed=int(s))[0] for e, s in zip(self._envs, seeds)]).astype(np.float32)
        O, C = torch.zeros(T, E, obs.shape[1]), torch.zeros(T, E, self.K + 1, m.ro_chain.shape[-1])
        R, V = torch.zeros(T, E), torch.zeros(T + 1, E)
        noise = lambda a, t, o: m(a, t, part="noise", obs=o)  # noqa: E731
        pol = lambda a, t, obs: self.velocity(m, a, t, {"obs": obs})  # noqa: E731
        for step in range(T):
            ot = _obs_tensor(obs)
            O[step] = ot
            V[step] = m(ot, None, part="value")
            _, chain = act(pol, ot, self.K, generator, noise=noise, return_chain=True,
                           action_dim=int(m.ro_chain.shape[-1]))
            C[step] = chain
            a = chain[:, -1].clamp(-1, 1).numpy() * self.max_action
            for i, e in enumerate(self._envs):
                o, r, term, trunc, _ = e.step(a[i])
                obs[i] = o
                R[step, i] = float(r)
        m.count("env_steps", E * T)
        V[T] = m(_obs_tensor(obs), None, part="value")  # time-limit truncation: bootstrap
        adv = torch.zeros(T, E)
        last = torch.zeros(E)
        r = R * self.reward_scale
        for step in range(T - 1, -1, -1):
            delta = r[step] + self.gamma * V[step + 1] - V[step]
            last = delta + self.gamma * self.lam * last
            adv[step] = last
        ret = adv + V[:T]
        flat = lambda z: z.transpose(0, 1).reshape(E * T, *z.shape[2:])  # noqa: E731  (env-major)
        m.ro_obs.copy_(flat(O))
        m.ro_chain.copy_(flat(C))
        m.ro_adv.copy_(flat(adv))
        m.ro_ret.copy_(flat(ret))
        logp, _, _ = self._chain_logp(m, m.ro_obs, m.ro_chain, grad=False)
        m.ro_logp.copy_(logp)
        ep_ret = float(R.sum(0).mean())
        k = float(m.ro_stats[0])
        m.ro_stats.copy_(torch.tensor([k + 1, ep_ret, (m.ro_stats[2] * k + ep_ret) / (k + 1)]))

    # ---------------------------------------------------------------- update
    def loss(self, x1, cond=None, x0=None, generator=None, model=None) -> Tensor:
        model = self.model if model is None else model
        m = _unwrap(model)
        n = self.n_envs * self.horizon
        per_epoch = math.ceil(n / self.minibatch)
        u = int(m.ro_updates)
        if u % self.updates_per_rollout == 0:
            self.collect(m, generator)
        if u % per_epoch == 0:
            m.ro_perm.copy_(torch.randperm(n, generator=generator))
        j = u % per_epoch
        idx = m.ro_perm[j * self.minibatch:(j + 1) * self.minibatch]
        m.ro_updates += 1
        obs, chain = m.ro_obs[idx], m.ro_chain[idx]
        adv = m.ro_adv[idx]
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)
        logp, kl, ent = self._chain_logp(m, obs, chain, grad=True)
        ratio = torch.exp(logp - m.ro_logp[idx])
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - self.clip, 1 + self.clip) * adv).mean()
        vloss = (model(obs, None, part="value") - m.ro_ret[idx]).pow(2).mean()
        loss = pg + self.vf_coef * vloss - self.ent_coef * ent.mean()
        if self.reg > 0:
            loss = loss + self.reg * kl.mean()
        return loss


def reinflow_finetune(base: Union[str, Path, nn.Module], out: Optional[Union[str, Path]] = None, rollouts: int = 20,
                      env_id: Optional[str] = None, denoise_steps: int = 4, lr: float = 1e-4, seed: int = 0,
                      progress: bool = True, ckpt_every: int = 50, reg: float = 0.0, grad_clip: float = 10.0,
                      log: str = "csv", **opts: Any) -> AlignResult:
    """ReinFlow-PPO fine-tuning of a behaviour-cloned flow policy for ``rollouts`` rollouts (a run in ``out``;
    resumes after a kill). ``log``: the training log (:mod:`straightflow.trainlog`). ``opts``:
    :class:`ReinFlowPPO` settings."""
    import copy
    import time

    from .base import load_base

    t0 = time.process_time()
    model, cfg, base_dir = load_base(base)
    env_id = env_id or (cfg.get("policy") or {}).get("env", "Pendulum-v1")
    policy = copy.deepcopy(model).train().requires_grad_(True)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    obj = ReinFlowPPO(policy, env_id=env_id, reg=reg, reference=ref, denoise_steps=denoise_steps, init_seed=seed, **opts)
    obj.probe(model, None, None, seed)
    steps = rollouts * obj.updates_per_rollout
    data = Dataset(torch.zeros(obj.n_envs, int(model.action_dim)), name="rollouts")
    info = {"method": "reinflow_ppo", "base_run": base_dir, "denoise_steps": denoise_steps, "rollouts": rollouts}
    trainer = AlignTrainer(obj, data, None if out is None else Path(out), steps, base_config=cfg, align_info=info,
                           batch_size=obj.n_envs, lr=lr, ema_decay=0.0, grad_clip=grad_clip, ckpt_every=ckpt_every,
                           seed=seed, progress=progress, log_every=min(50, steps), log=log)
    res = trainer.fit()
    module = _unwrap(trainer.model)
    pol = export_policy(module)
    pol.run_config = trainer.run_config() | {"model": policy_config(module.policy)}
    cost = dict(module.costs())
    cost["seconds"] = round(time.process_time() - t0, 3)
    cost["rollout_returns_mean"] = float(module.ro_stats[2])
    return AlignResult(run_dir=None if out is None else Path(out), model=pol, module=module, steps=res.steps,
                       final_loss=res.final_loss, history=res.history, cost=cost, objective=obj)
