"""The solver suite's fixed settings: fields, NFE lists, reference tolerances, batch sizes."""
from __future__ import annotations

DEFAULT_FIELDS = ("oracle2d", "oracle64d", "checkerboard", "digits", "digits-cfg")
OPTIONAL_FIELDS = ("mnist",)  # opt-in (--fields ...,mnist): training and the float64 reference cost ~an hour on CPU
DEFAULT_NFES = (3, 4, 5, 6, 7, 8, 9, 10)
QUICK_NFES = (3, 4, 5, 8, 15, 20)
METRIC_NFES = (4, 8)
QUALITY_NFE = 100  # the distribution metric of a good fixed solver at this NFE, next to NFE 4
QUALITY_SOLVER = "rk4"  # 25 steps = 100 NFE
GUIDANCE = 2.0  # the classifier-free guidance scale of the digits-cfg field
SEARCH_CANDIDATES = ("euler", "midpoint", "heun")
REF_RTOL = 1e-8
REF_RTOL_TRAINED = 1e-6  # float32 networks (run in float64 for the reference): their own rounding is ~1e-7
QUICK_REF_RTOL = 1e-6  # --quick: numbers not meaningful, the reference need not be 1e-8 exact
REF_RK4_STEPS = 2048
FIELD_CACHE_VERSION = 1
FIELD_ALIASES = {"2d": "checkerboard", "moons": "moons", "checkerboard": "checkerboard", "image": "digits",
                 "cfg": "digits-cfg"}

# per-field sizes: (eval batch, calibration batch, BOSS candidates for non-Euler solvers)
SIZES = {"oracle2d": (1000, 256, 32), "oracle64d": (256, 64, 32), "checkerboard": (1000, 256, 32),
          "moons": (1000, 256, 32), "digits": (128, 32, 24), "digits-cfg": (128, 32, 24),
          "mnist": (64, 16, 12)}
QUICK_SIZES = (192, 48, 12)
