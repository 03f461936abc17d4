import os

# 8 virtual CPU devices for the sharding tests; must be set before JAX is imported. The tests' programs run for
# seconds and compile for minutes (`python profiles.py suite`), so they are compiled for compile time: LLVM's
# optimisation level 0 (one test file: 296 s -> 179 s) and XLA CPU's older fusion code generator (the whole
# suite's XLA compile time 645 s -> 333 s). Neither changes a check. The few programs that run long ask for more
# themselves (`compiler_options`): the closed-form testbed's 2,000 updates for level 3; the exact teacher's 512-step
# samplers and the metrics' pairwise sums for level 3 and the fusion emitters, XLA's defaults.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# pytest-xdist (`-n 2`): each worker process keeps to its own share of the cores, and so do the train.py processes
# it starts. JAX sizes its thread pool by this affinity, so one worker's XLA threads no longer preempt the other's:
# five test files with `-n 2` took 172 s and 183 s pinned, 206 s and 196 s not, run in turn.
_worker, _workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _worker and hasattr(os, "sched_setaffinity") and 1 < _workers <= len(os.sched_getaffinity(0)):
    _cores, _i = sorted(os.sched_getaffinity(0)), int(_worker.removeprefix("gw"))
    _per = len(_cores) // _workers
    try:
        os.sched_setaffinity(0, _cores[_i * _per:(_i + 1) * _per])
    except OSError:  # a sandbox that forbids it: the workers share the cores, as without pinning
        pass
os.environ["MMD_TEACHER_CACHE"] = ""  # train.py runs of the tests train their own teachers (no cache under runs/)
# JAX's persistent compilation cache, shared by every test process (pytest-xdist's workers) and the train.py
# processes the tests start: a program compiled once loads from disk when it is met again, after the per-file
# drop of compiled programs below or in another process. Delete .jax_cache/ at will.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI: derandomised and bounded. Thorough: `HYPOTHESIS_PROFILE=thorough pytest`.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=6, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running checks, skipped by .ci/run (run with `pytest -m slow`)")


# The tests that run for a minute or more (`python profiles.py suite`) start first: with `-n 2 --dist worksteal`,
# the process that finishes its share early takes over the other's remaining short tests, so no long test is
# left to run alone at the end.
LONG_FIRST = ("test_train.py::test_smoke_preset_end_to_end", "test_mmd.py::test_sampler_converges_with_exact_teacher",
              "test_own_teacher.py::test_example_own_teacher")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # only in pytest-xdist's worker processes, which share the tests out
        items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # stable: file order otherwise


# Each compiled XLA CPU program holds memory mappings until it is freed, and Linux caps a process at
# vm.max_map_count of them (65,530 by default). The whole suite in one process went past it: a compile then
# failed and the process died with a segmentation fault while reporting the error (CI, exit 139; measured
# here: 17,000 mappings after test_losses.py alone). So compiled programs are dropped after every test file,
# and after any test that leaves more than a third of the cap in use.
import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


def _free_compiled_programs():
    jax.clear_caches()
    gc.collect()


def _mappings():
    try:
        with open("/proc/self/maps") as f:
            n = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return n, int(f.read())
    except OSError:  # not Linux
        return 0, 1


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_per_file():
    yield
    _free_compiled_programs()


@pytest.fixture(autouse=True)
def _free_compiled_programs_when_many():
    yield
    n, cap = _mappings()
    if n > cap // 3:
        _free_compiled_programs()


# Profile of the suite (`MMD_PROFILE=profile.json pytest ...`, read by `python benchmarks.py profile`): each
# test's wall time and the seconds JAX spent tracing, lowering and compiling in it, and the number of XLA
# compilations, from JAX's own monitoring events.
_PROFILE = os.environ.get("MMD_PROFILE")
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_now = {"trace": 0.0, "lower": 0.0, "compile": 0.0, "compiles": 0}
_tests = {}

if _PROFILE:
    import json  # noqa: E402
    import time  # noqa: E402

    def _on_duration(event, seconds, **_):
        part = _COMPILE_EVENTS.get(event)
        if part is not None:
            _now[part] += seconds
            _now["compiles"] += part == "compile"

    jax.monitoring.register_event_duration_secs_listener(_on_duration)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before, t0 = dict(_now), time.perf_counter()
        yield
        row = {k: _now[k] - before[k] for k in _now}
        row["wall"] = time.perf_counter() - t0
        _tests[item.nodeid] = row

    def pytest_sessionfinish(exitstatus):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        path = _PROFILE if not worker else f"{_PROFILE}.{worker}"
        with open(path, "w") as f:
            json.dump(_tests, f, indent=0)
