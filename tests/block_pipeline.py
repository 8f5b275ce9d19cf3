"""A Dask worker preload (``--preload block_pipeline``): this worker cannot import the pipeline package, as on a
host where the project is not installed (tests/test_dask.py)."""

import sys


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
