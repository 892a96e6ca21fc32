"""pytest setup for the whole repository."""

import atexit
import os
import shutil
import tempfile

# One persistent XLA compilation cache for this test session, shared with the
# subprocesses the tests start (they inherit the environment): many tests
# compile the same tiny train step, in this process and in fresh ones. It
# starts empty every session, so it only saves repeated compiles of one run.
# Set before anything imports jax, which reads it at import.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='dplh-jax-test-xla-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Compiling is most of the suite's time, and XLA's CPU backend compiles in
# about half the time without LLVM's optimizations. The HLO is the same, but
# float32 results can differ in the last ulp (no FMA contraction), so
# `make test` runs the DP core's tests and doctests at the default level
# (its XLA_FLAGS wins over this one). Subprocesses inherit it. Set before
# jax is imported.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_backend_optimization_level=0').strip()

# The command modules each define absl flags (--config, --workdir) at import,
# as absl mains do; one process cannot import two of them, so doctest
# collection skips them (tests run them as subprocesses instead).
collect_ignore_glob = ['dplh_jax/hyperface/cli/*.py']
