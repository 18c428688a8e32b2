"""Read RLBench pickles without RLBench, and without running code from the file.

Data from the internet is untrusted: `pickle.load` would import and call any global the file
names (`os.system` included). `load_rlbench_pickle` maps RLBench's two classes to the local
stand-ins below and allows only the numpy pieces that rebuild arrays and scalars; every other
global is refused with `UnsafePickleError` before anything is called.
"""

from __future__ import annotations

import io
import pickle


class Observation:
    """Stand-in for `rlbench.backend.observation.Observation`: attributes as pickled.

    Fields vary across RLBench versions; read them with `getattr(obs, name, None)`."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class Demo:
    """Stand-in for `rlbench.demo.Demo`: `_observations` (list of Observation), `random_seed`, ..."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self._observations)

    def __getitem__(self, i: int) -> Observation:
        return self._observations[i]


STAND_INS = {
    ("rlbench.demo", "Demo"): Demo,
    ("rlbench.backend.observation", "Observation"): Observation,
}

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric", "numpy")
_NUMPY_NAMES = {"_reconstruct", "scalar", "ndarray", "dtype", "_frombuffer"}
_OTHER_ALLOWED = {("copyreg", "_reconstructor"), ("builtins", "object"), ("_codecs", "encode")}
"""copyreg._reconstructor rebuilds objects pickled with protocols 0/1; it only calls the class and
base it is given, which themselves pass through this allow-list. _codecs.encode turns text back
into bytes in protocol-2 pickles (numpy array buffers)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in STAND_INS:
            return STAND_INS[(module, name)]
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES or module.startswith("numpy.dtypes") and name.endswith("DType"):
            return super().find_class(module, name)
        if (module, name) in _OTHER_ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refused to load global {module}.{name}: RLBench data files may only contain RLBench "
            "demos/observations, numpy arrays and plain Python values"
        )


def loads_rlbench(data: bytes):
    """Unpickle bytes through the allow-list."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()


def load_rlbench_pickle(path):
    """Unpickle a file through the allow-list; any failure names the file."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise CorruptEpisodeError(f"missing RLBench file {path}") from None
    except Exception as e:
        raise CorruptEpisodeError(f"cannot read RLBench pickle {path}: {type(e).__name__}: {e}") from e


class CorruptEpisodeError(RuntimeError):
    """An episode file is unreadable (truncated pickle, broken PNG, missing step)."""
