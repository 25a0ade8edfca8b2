"""Inference-time scaling of a trained flow with a reward, under an exact NFE budget.

Kim et al. 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation and Rollover
Budget Forcing" (RBF). The ingredients, all without retraining:

* **SDE conversion.** The flow's ODE ``dx = v dt`` and the SDE
  ``dx = [v + g(t)^2/2 * s] dt + g(t) dW`` share the marginals for every ``g >= 0``, with the score
  ``s = -x0_hat / sigma`` read off the velocity through the path (solver ``"sde"``, reused here).
* **Interpolant conversion** (linear -> VP): ``convert_velocity(model, "linear", "vp")`` is the VP
  velocity of the same marginals up to the scale ``c`` and the SNR-matched time ``tau(t)``; the
  sampling grid is reparametrised by matching SNRs too (``t_vp = t_from_log_snr_vp(log_snr_lin(t))``),
  so the VP sampler visits the same noise levels as the linear one, with a larger variance schedule
  (more diverse stochastic proposals).
* **Search.** :func:`best_of_n` (ODE or SDE, N paths), :func:`smc` (particle filtering with
  potentials ``exp(lam r(x1_hat))``, ratio weights, systematic resampling when the ESS falls below a
  threshold) and :func:`rbf` (Rollover Budget Forcing: per-step NFE quotas, draw SDE proposals until
  one improves the reward of its ``x1_hat``, roll the unused NFE to later steps).

Budgets count velocity evaluations per output sample (one per batch row; a guided model with
``evals_per_call = 2`` counts 2), exactly as the solvers do; no method ever exceeds its budget (a
guard raises :class:`BudgetExceeded` if one tried). Reward calls are not NFE and are reported apart.
Final samples are Tweedie estimates ``x1_hat`` at the last grid time before 1 (on the linear path
this equals the last Euler step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..grids import make_grid
from ..paths import AffinePath, PathSpec, convert_velocity, get_path
from ..registry import Registry
from ..solvers import CountedVelocity, drive, get_solver, initial_noise, solve
from ..solvers.sde import euler_maruyama
from .rewards import ClassLogProb, RegionReward, as_reward

__all__ = ["SearchResult", "BudgetExceeded", "prepare", "time_grid", "posterior_x1", "score", "sde_sample",
           "best_of_n", "smc", "rbf", "search", "METHODS", "SEARCH_METHODS", "available", "register_search_method", "DEFAULT_SCALE", "diversity", "hit_rate", "systematic_resample",
           "effective_sample_size"]


# Diffusion scale c of the search SDEs, g(t) = c sigma(t): larger than the "sigma" default of the
# plain SDE sampler so that proposals differ enough to be worth scoring (Kim et al. also raise it).
DEFAULT_SCALE = 3.0


class BudgetExceeded(RuntimeError):
    """A search method tried to evaluate the velocity beyond its NFE budget."""


@dataclass
class SearchResult:
    """Chosen samples ``x`` (n, ...), their ``rewards`` (n,), ``nfe`` per output (<= ``budget``)."""

    x: Tensor
    rewards: Tensor
    nfe: int
    budget: int
    info: Dict[str, Any] = field(default_factory=dict)


class _Counted(CountedVelocity):
    """The counted velocity (rows computed: NFE per output = rows / outputs) refusing to overspend."""

    def __init__(self, velocity: Callable, limit_rows: int) -> None:
        super().__init__(velocity, check_finite=False)
        self.limit = int(limit_rows)

    def __call__(self, x: Tensor, t: Union[Tensor, float], i: int = -1, **cond: Any) -> Tensor:
        per = int(getattr(self.model, "evals_per_call", 1))
        if self.rows + per * x.shape[0] > self.limit:
            raise BudgetExceeded(f"{self.rows} + {per * x.shape[0]} rows would exceed the budget of {self.limit}")
        return super().__call__(x, t, i, **cond)


# ----------------------------------------------------------------------------- conversions
def prepare(model: Callable, path: PathSpec = "linear", vp: bool = False) -> Tuple[Callable, AffinePath]:
    """``(velocity, sampling path)``: the model itself, or its VP conversion when ``vp``."""
    if vp:
        return convert_velocity(model, path, "vp"), get_path("vp")
    return model, get_path(path)


def time_grid(steps: int, path: PathSpec = "linear", vp: bool = False, grid: str = "uniform") -> Tensor:
    """Sampling grid (float64, 0 -> 1). With ``vp`` a ``grid`` on ``path`` is moved to VP time by
    matching log-SNRs (``lambda_vp(t') = lambda_path(t)``), ends pinned to 0 and 1."""
    g = make_grid(grid, steps)
    if not vp:
        return g
    src, vpp = get_path(path), get_path("vp")
    inner = g[1:-1]
    mapped = vpp.t_from_log_snr(src.log_snr(inner)).clamp(0, 1) if inner.numel() else inner
    # Linear times below the VP path's lowest SNR (t < ~0.0066 for the default VP) all map to 0:
    # spread them evenly between 0 and the first time that maps inside, keeping the step count.
    low = int((mapped <= 1e-12).sum())
    if 0 < low < mapped.numel():
        first = float(mapped[low])
        mapped[:low] = first * torch.arange(1, low + 1, dtype=g.dtype) / (low + 1)
    out = torch.cat([g.new_zeros(1), mapped, g.new_ones(1)])
    if not bool((out[1:] > out[:-1]).all()):
        raise ValueError(f"could not map a {steps}-step grid to strictly increasing VP times")
    return out


def _tb(t, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def posterior_x1(velocity: Callable, path: PathSpec, x: Tensor, t, cond: Optional[Dict[str, Any]] = None) -> Tensor:
    """Tweedie's data prediction ``x1_hat = E[x1 | x_t] = (sigma' x - sigma v) / (alpha sigma' - sigma alpha')``."""
    p, tb = get_path(path), _tb(t, x)
    return p.velocity_to_x1(velocity(x, tb, **(cond or {})), x, tb)


def score(velocity: Callable, path: PathSpec, x: Tensor, t, cond: Optional[Dict[str, Any]] = None) -> Tensor:
    """Marginal score from the velocity: ``s = -x0_hat / sigma`` (N(0, I) source)."""
    p, tb = get_path(path), _tb(t, x)
    return p.velocity_to_score(velocity(x, tb, **(cond or {})), x, tb)


def sde_sample(model: Callable, noise: Tensor, steps: int = 50, path: PathSpec = "linear", vp: bool = False,
               g: Union[float, str, Callable] = "sigma", scale: float = 1.0, cond: Optional[Dict[str, Any]] = None,
               generator: Optional[torch.Generator] = None, last_step: str = "denoise"):
    """Sample the marginal-preserving SDE ``dx = [v + g^2/2 s] dt + g dW`` of a flow (solver ``"sde"``),
    on its own path or, with ``vp``, on the VP interpolant (SNR-matched grid). Returns a SampleResult."""
    vel, sp = prepare(model, path, vp)
    return solve(vel, noise, time_grid(steps, path, vp), "sde", cond=cond, generator=generator, path=sp,
                 g=g, scale=scale, last_step=last_step)


# ----------------------------------------------------------------------------- helpers
def _rows_cond(cond: Optional[Dict[str, Any]], n: int, k: int) -> Dict[str, Any]:
    """Repeat per-output conditioning (first dim ``n``) ``k`` times per output (row-major)."""
    out = {}
    for key, val in (cond or {}).items():
        if torch.is_tensor(val) and val.ndim >= 1 and val.shape[0] == n and k > 1:
            out[key] = val.repeat_interleave(k, 0)
        else:
            out[key] = val
    return out


def _index_cond(cond: Dict[str, Any], idx: Tensor, rows: int) -> Dict[str, Any]:
    return {k: (v[idx] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == rows else v) for k, v in cond.items()}


def _check_budget(budget: int, n: int) -> Tuple[int, int]:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1 (velocity evaluations per output), got {budget!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of outputs) must be an integer >= 1, got {n!r}")
    return budget, n


def _evals(model: Callable, budget: int) -> int:
    """Velocity calls a budget pays for: a model computing ``evals_per_call`` rows per sample (guidance)
    is charged that many NFE per call."""
    return budget // max(1, int(getattr(model, "evals_per_call", 1)))


def _sde_step(path: AffinePath, x: Tensor, v: Tensor, t: float, t_next: float, g, scale: float,
              generator: torch.Generator, last: bool) -> Tensor:
    """One Euler-Maruyama step of solver ``"sde"`` with the velocity ``v`` already evaluated at ``(x, t)``;
    the step into t = 1 (``last``) is the Tweedie jump ``x1_hat``."""
    return drive(euler_maruyama(x, [float(t), float(t_next)], generator=generator, path=path, g=g,
                                 scale=scale, last_step="denoise" if last else "sde"), lambda *_: v)


def _rewards(reward: Callable, x: Tensor) -> Tensor:
    with torch.no_grad():
        r = reward(x)
    r = torch.as_tensor(r).reshape(-1).to(torch.float64)
    if r.shape[0] != x.shape[0]:
        raise ValueError(f"reward returned {r.shape[0]} values for {x.shape[0]} samples")
    return torch.nan_to_num(r, nan=-math.inf)


def effective_sample_size(log_w: Tensor) -> Tensor:
    """``ESS = 1 / sum_i w_i^2`` of normalised weights, per row of ``log_w`` (n, N)."""
    w = torch.softmax(log_w, dim=-1)
    return 1.0 / (w * w).sum(-1)


def systematic_resample(log_w: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Systematic resampling (one uniform per row): indices (n, N) with ``u_j = (U + j) / N``."""
    n, N = log_w.shape
    w = torch.softmax(log_w.to(torch.float64), dim=-1)
    cdf = torch.cumsum(w, dim=-1)
    cdf[:, -1] = 1.0
    u = (torch.rand(n, 1, generator=generator, dtype=torch.float64) + torch.arange(N, dtype=torch.float64)) / N
    return torch.searchsorted(cdf, u).clamp_max(N - 1)


# ----------------------------------------------------------------------------- best-of-N
def best_of_n(model: Callable, reward: Callable, shape: Sequence[int], budget: int, n: int = 1, *,
              particles: Optional[int] = None, steps: Optional[int] = None, sde: bool = False, vp: bool = False,
              solver: str = "euler", path: PathSpec = "linear", cond: Optional[Dict[str, Any]] = None,
              g: Union[float, str, Callable] = "sigma", scale: float = DEFAULT_SCALE, seed: Optional[int] = 0,
              generator: Optional[torch.Generator] = None, chunk: Optional[int] = None) -> SearchResult:
    """Best-of-N: generate N samples per output (ODE with N noises, or SDE with N paths) and keep the
    one with the highest reward. ``N * nfe(steps) <= budget``; by default ``steps = min(10, budget)``
    and ``N = budget // nfe(steps)``. ``info["candidate_rewards"]`` holds all (n, N) rewards."""
    budget, n = _check_budget(budget, n)
    solver = "sde" if sde else solver
    spec = get_solver(solver)
    if spec.stochastic and not sde:
        raise ValueError(f"solver {solver!r} is stochastic; use sde=True (best_of_n_sde) for stochastic paths")
    if particles is not None and steps is not None:
        raise ValueError("give particles or steps (the other follows from the budget), not both")
    full_budget, budget = budget, _evals(model, budget)
    if particles is not None:
        if particles < 1 or budget // particles < spec.nfe(1):
            raise ValueError(f"budget {budget} cannot pay for {particles} particles with solver {solver!r}")
        steps = spec.steps_for_nfe(budget // particles)
    if steps is None:
        steps = min(10, spec.steps_for_nfe(budget)) if spec.nfe(1) <= budget else 0
    if steps < 1 or spec.nfe(steps) > budget:
        raise ValueError(f"budget {budget} is below the cost of {steps} step(s) of {solver!r} ({spec.nfe(max(steps, 1))} NFE)")
    N = particles if particles is not None else budget // spec.nfe(steps)
    vel, sp = prepare(model, path, vp)
    f = _Counted(vel, full_budget * n)
    grid = time_grid(steps, path, vp)
    rows = n * N
    noise, gen = initial_noise((rows, *shape), seed=seed, generator=generator)
    conds = _rows_cond(cond, n, N)
    chunk = rows if chunk is None else max(1, int(chunk))
    xs = []
    opts = dict(g=g, scale=scale, last_step="denoise") if sde else {}
    with torch.no_grad():
        for i in range(0, rows, chunk):
            idx = torch.arange(i, min(i + chunk, rows))
            c = _index_cond(conds, idx, rows)
            xs.append(solve(f, noise[idx], grid, solver, cond=c, generator=gen, path=sp, **opts).x)
    x = torch.cat(xs)
    r = _rewards(reward, x).reshape(n, N)
    best = r.argmax(1)
    pick = torch.arange(n) * N + best
    return SearchResult(x=x[pick], rewards=r.max(1).values, nfe=f.rows // n, budget=full_budget,
                        info={"method": "best_of_n_sde" if sde else "best_of_n", "particles": N, "steps": steps,
                              "solver": solver, "vp": vp, "candidate_rewards": r, "best_index": best,
                              "reward_calls": 1, "total_nfe": f.rows})


# ----------------------------------------------------------------------------- SMC
def smc(model: Callable, reward: Callable, shape: Sequence[int], budget: int, n: int = 1, *,
        particles: Optional[int] = None, steps: int = 10, lam: float = 10.0, ess_threshold: float = 0.5,
        vp: bool = False, path: PathSpec = "linear", cond: Optional[Dict[str, Any]] = None,
        g: Union[float, str, Callable] = "sigma", scale: float = DEFAULT_SCALE, seed: Optional[int] = 0,
        generator: Optional[torch.Generator] = None) -> SearchResult:
    """Sequential Monte Carlo on the SDE (particle filtering; Wu et al. 2023 "TDS", Kim et al. 2025).

    N particles per output; at grid time ``t_i`` each pays 1 NFE for ``v``, gives ``x1_hat`` and
    ``r_i = r(x1_hat)``; log-weights grow by ``lam (r_i - r_{i-1})`` (ratio of potentials
    ``exp(lam r)``); when ``ESS < ess_threshold * N`` the particles are systematically resampled
    and the weights reset; then an SDE step. Cost ``N * steps <= budget``. Output: the particle with
    the highest final reward per output.
    """
    budget, n = _check_budget(budget, n)
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
    full_budget, budget = budget, _evals(model, budget)
    steps = max(1, min(int(steps), budget))
    N = int(particles) if particles is not None else budget // steps
    if N < 1 or N * steps > budget:
        raise ValueError(f"budget {budget} cannot pay for {N} particles x {steps} steps")
    vel, sp = prepare(model, path, vp)
    f = _Counted(vel, full_budget * n)
    ts = time_grid(steps, path, vp).tolist()
    rows = n * N
    conds = _rows_cond(cond, n, N)
    x, gen = initial_noise((rows, *shape), seed=seed, generator=generator)
    log_w = torch.zeros(n, N, dtype=torch.float64)
    r_prev = torch.zeros(n, N, dtype=torch.float64)
    resamples = 0
    with torch.no_grad():
        for i in range(steps):
            t = ts[i]
            v = f(x, t, **conds)
            tb = _tb(t, x)
            x1 = sp.velocity_to_x1(v, x, tb)
            r = _rewards(reward, x1).reshape(n, N)
            log_w = log_w + lam * (r - r_prev)
            r_prev = r
            if i == steps - 1:
                x = x1
                break
            if ess_threshold > 0 and bool((effective_sample_size(log_w) < ess_threshold * N).any()):
                ess_low = effective_sample_size(log_w) < ess_threshold * N
                idx = systematic_resample(log_w, gen)
                keep = torch.arange(N).expand(n, N)
                idx = torch.where(ess_low[:, None], idx, keep)
                flat = (torch.arange(n)[:, None] * N + idx).reshape(-1)
                x, v = x[flat], v[flat]
                r_prev = r_prev.gather(1, idx)
                log_w = torch.where(ess_low[:, None], torch.zeros_like(log_w), log_w)
                resamples += int(ess_low.sum())
            x = _sde_step(sp, x, v, t, ts[i + 1], g, scale, gen, last=False)
    best = r_prev.argmax(1)
    pick = torch.arange(n) * N + best
    return SearchResult(x=x[pick], rewards=r_prev.max(1).values, nfe=f.rows // n, budget=full_budget,
                        info={"method": "smc", "particles": N, "steps": steps, "lam": lam, "vp": vp,
                              "resamples": resamples, "reward_calls": steps, "total_nfe": f.rows})


# ----------------------------------------------------------------------------- RBF
def rbf(model: Callable, reward: Callable, shape: Sequence[int], budget: int, n: int = 1, *,
        steps: int = 10, init_particles: int = 1, vp: bool = False, path: PathSpec = "linear",
        cond: Optional[Dict[str, Any]] = None, g: Union[float, str, Callable] = "sigma", scale: float = DEFAULT_SCALE,
        seed: Optional[int] = 0, generator: Optional[torch.Generator] = None) -> SearchResult:
    """Rollover Budget Forcing (Kim et al. 2025) with an exact budget per output.

    ``K0 = init_particles`` noises are scored by ``r(x1_hat(t_0))`` and the best starts the chain.
    The remaining ``budget - K0`` NFE are spread over the ``steps - 1`` transitions
    ``t_k -> t_{k+1}`` (quota ``q = (budget - K0) // (steps - 1)``, the last transition takes all that
    is left). At each transition, SDE proposals from the current state are drawn one at a time
    (1 NFE each: ``v`` at the proposal, whence ``x1_hat`` and its reward); the first proposal whose
    reward beats the best so far is accepted at once and the unused quota rolls over to the next
    transition; if the quota runs out the step's best proposal is taken. The last transition spends
    everything left and returns its best ``x1_hat``. All chains advance in lock-step batches (per-row
    times), 1 NFE per chain per round, so each chain spends exactly ``budget``.
    """
    budget, n = _check_budget(budget, n)
    K0 = int(init_particles)
    if K0 < 1:
        raise ValueError(f"init_particles must be >= 1, got {init_particles}")
    full_budget, budget = budget, _evals(model, budget)
    steps = int(steps)
    if steps < 2:
        raise ValueError(f"RBF needs steps >= 2, got {steps}")
    if budget < K0 + 1:
        raise ValueError(f"RBF needs a budget >= init_particles + 1 = {K0 + 1}, got {budget}")
    steps = min(steps, budget - K0 + 1)
    vel, sp = prepare(model, path, vp)
    f = _Counted(vel, full_budget * n)
    ts = time_grid(steps, path, vp)
    tsl = ts.tolist()
    last = steps - 1  # index of the final search time; the jump to t = 1 is x1_hat there
    q = (budget - K0) // (steps - 1)

    with torch.no_grad():
        # initial particles: K0 noises per chain, keep the best x1_hat(t_0)
        conds0 = _rows_cond(cond, n, K0)
        x0, gen = initial_noise((n * K0, *shape), seed=seed, generator=generator)
        v0 = f(x0, tsl[0], **conds0)
        x1 = sp.velocity_to_x1(v0, x0, _tb(tsl[0], x0))
        r0 = _rewards(reward, x1).reshape(n, K0)
        pick = torch.arange(n) * K0 + r0.argmax(1)
        x, v, best = x0[pick], v0[pick], r0.max(1).values
        conds = dict(cond or {})
        k = torch.zeros(n, dtype=torch.long)  # current grid index per chain
        used = torch.zeros(n, dtype=torch.long)  # proposals spent at the current transition
        quota = torch.full((n,), q, dtype=torch.long)
        sb_r = torch.full((n,), -math.inf, dtype=torch.float64)  # this step's best proposal
        sb_x, sb_v, sb_x1 = x.clone(), v.clone(), x1[pick].clone()
        rollovers, forced = 0, 0
        for _ in range(budget - K0):
            # propose: one SDE step per chain from its own time t_k to t_{k+1}
            prop = torch.empty_like(x)
            for kk in torch.unique(k).tolist():
                rows = (k == kk).nonzero().reshape(-1)
                prop[rows] = _sde_step(sp, x[rows], v[rows], tsl[kk], tsl[kk + 1], g, scale, gen, last=False)
            t_next = ts[k + 1].to(x.dtype)
            v_new = f(prop, t_next, **conds)
            x1_new = sp.velocity_to_x1(v_new, prop, t_next)
            r_new = _rewards(reward, x1_new)
            used += 1
            upd = r_new > sb_r
            sb_r = torch.where(upd, r_new, sb_r)
            sb_x[upd], sb_v[upd], sb_x1[upd] = prop[upd], v_new[upd], x1_new[upd]
            final = (k + 1) == last
            improve = r_new > best
            best = torch.where(improve, r_new, best)
            roll = improve & ~final
            full = (used >= quota) & ~roll & ~final
            move = roll | full
            if bool(move.any()):
                x[roll], v[roll] = prop[roll], v_new[roll]
                x[full], v[full] = sb_x[full], sb_v[full]
                carry = torch.where(roll, quota - used, torch.zeros_like(used))
                quota = torch.where(move, q + carry, quota)
                used = torch.where(move, torch.zeros_like(used), used)
                k = torch.where(move, k + 1, k)
                sb_r = torch.where(move, torch.full_like(sb_r, -math.inf), sb_r)
                rollovers += int(roll.sum())
                forced += int(full.sum())
        # chains that never reached the final transition (cannot happen with q >= 1) keep their step best
    return SearchResult(x=sb_x1, rewards=sb_r, nfe=f.rows // n, budget=full_budget,
                        info={"method": "rbf", "steps": steps, "init_particles": K0, "quota": q, "vp": vp,
                              "rollovers": rollovers, "forced_steps": forced, "final_index": k.tolist(),
                              "reward_calls": budget - K0 + 1, "total_nfe": f.rows})


# ----------------------------------------------------------------------------- dispatch
SEARCH_METHODS: Registry = Registry("search method")
SEARCH_METHODS.register("best_of_n", aliases=("best-of-n", "bon"))(best_of_n)
SEARCH_METHODS.register("best_of_n_sde", aliases=("best-of-n-sde",))(partial(best_of_n, sde=True))
SEARCH_METHODS.register("smc")(smc)
SEARCH_METHODS.register("rbf", aliases=("rollover",))(rbf)

# name -> function, in registration order (the command line's choices, the benchmark's rows); modules
# that add a method (e.g. :mod:`.nrg`) register it with :func:`register_search_method`
METHODS: Dict[str, Callable[..., SearchResult]] = {n: SEARCH_METHODS.get(n) for n in
                                                   ("best_of_n", "best_of_n_sde", "smc", "rbf")}


def register_search_method(name: str, aliases: Sequence[str] = ()) -> Callable:
    """Decorator: add a search method ``fn(model, reward, shape, budget, n, **options) -> SearchResult``."""
    def deco(fn: Callable[..., SearchResult]) -> Callable[..., SearchResult]:
        SEARCH_METHODS.register(name, aliases=aliases)(fn)
        METHODS[name] = fn
        return fn
    return deco


def available() -> list:
    """Names accepted by :func:`search` (``straightflow search --method``)."""
    return list(METHODS)


def search(model: Callable, reward, shape: Sequence[int], budget: int, method: str = "rbf", n: int = 1,
           **kwargs) -> SearchResult:
    """Run one search method by name (:data:`SEARCH_METHODS`): best_of_n, best_of_n_sde, smc, rbf, nrg."""
    fn = SEARCH_METHODS.get(str(method).replace("-", "_"))
    return fn(model, as_reward(reward), tuple(shape), int(budget), n, **kwargs)


# ----------------------------------------------------------------------------- measures
def diversity(x: Tensor, features: Optional[Callable[[Tensor], Tensor]] = None) -> float:
    """Mean pairwise Euclidean distance between outputs (in ``features(x)`` space if given)."""
    z = features(x) if features is not None else x
    z = torch.as_tensor(z).detach().reshape(z.shape[0], -1).to(torch.float64)
    if z.shape[0] < 2:
        return 0.0
    d = torch.cdist(z, z)
    m = z.shape[0]
    return float(d.sum() / (m * (m - 1)))


def hit_rate(reward: Callable, x: Tensor) -> Optional[float]:
    """Fraction of outputs that meet the reward's goal: predicted class = target, or inside the region."""
    with torch.no_grad():
        if isinstance(reward, ClassLogProb):
            return float((reward.logits(x).argmax(-1) == reward.target).float().mean())
        if isinstance(reward, RegionReward):
            return float((reward.signed_distance(x) >= 0).float().mean())
    return None
