"""The report's source locations carry no absolute path of this machine."""

from __future__ import annotations

import re

import pypdf

import pipeline.gateway
from pipeline.audit.base.paths import short_path, short_site


def test_stdlib_site_packages_and_our_package_are_named_by_their_root():
    assert short_path(re.__file__) == "stdlib:re/__init__.py"
    assert short_path(pypdf.__file__) == "site-packages:pypdf/__init__.py"
    assert short_path(pipeline.gateway.__file__) == "pipeline/gateway.py"
    assert short_site(pipeline.gateway.__file__, 12) == "pipeline/gateway.py:12"


def test_unknown_absolute_paths_keep_only_their_file_name_and_pseudo_files_pass_through():
    assert short_path("/home/someone/checkout/tool.py") == "tool.py"
    assert short_path("/usr/lib/python3/dist-packages/yaml/reader.py") == "site-packages:yaml/reader.py"
    assert short_path("<frozen importlib._bootstrap>") == "<frozen importlib._bootstrap>"
    assert not short_site("/opt/x/y.py", None).startswith("/")
