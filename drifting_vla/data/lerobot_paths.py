"""The file paths a LeRobot v3.0 `meta/info.json` describes, kept inside the dataset.

info.json holds `str.format` templates for the data and video files:

    data_path   data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet
    video_path  videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4

A dataset from the hub is untrusted, and `str.format` on such a template would follow
`{video_key.__class__.__mro__}` into the attributes of its arguments, and a `../../..` in it out
of the dataset. So a template may only name the fields its key takes, with at most a format spec
(no attribute or index access, no conversion), the values are plain integers and the feature keys
the dataset declares, and every path must lie under the dataset root. That check is on the path as
written (`..` segments, an absolute path), not on where symlinks lead: a dataset in the hub cache
is a tree of symlinks into the cache's blob store, made by the downloader, not by info.json.
"""

from __future__ import annotations

import os
import pathlib
import string

TEMPLATE_FIELDS = {"data_path": ("chunk_index", "file_index"), "video_path": ("video_key", "chunk_index", "file_index")}


def check_template(info: dict, key: str, info_file: pathlib.Path) -> str:
    """`info[key]` as a template naming only TEMPLATE_FIELDS[key]; ValueError naming the file and key."""
    template = info.get(key)
    if not isinstance(template, str):
        raise ValueError(f"{info_file}: key {key!r} must be a path template (a string), got {template!r}")
    allowed = TEMPLATE_FIELDS[key]
    try:
        fields = [(name, conversion) for _, name, _, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"{info_file}: key {key!r}={template!r} is not a path template ({error})") from None
    for name, conversion in fields:
        if name not in allowed or conversion is not None:
            raise ValueError(
                f"{info_file}: key {key!r}={template!r} has the field {{{name}{'!' + conversion if conversion else ''}}}; "
                f"a {key} may only name {['{' + f + '}' for f in allowed]} (with a format spec such as :03d)"
            )
    return template


def dataset_file(root: pathlib.Path, info: dict, key: str, info_file: pathlib.Path, **values: int | str) -> pathlib.Path:
    """root / info[key] formatted with `values` (plain ints, and a feature key for `video_key`),
    checked to lie under `root`; ValueError naming the file, key and the path otherwise."""
    template = check_template(info, key, info_file)
    plain = {name: value if isinstance(value, str) else int(value) for name, value in values.items()}
    relative = template.format(**plain)
    normalized = os.path.normpath(relative)
    if os.path.isabs(normalized) or normalized == os.pardir or normalized.startswith(os.pardir + os.sep):
        raise ValueError(
            f"{info_file}: key {key!r}={template!r} gives the path {relative!r}, which lies outside the dataset "
            f"{root}; a dataset's files are under its root"
        )
    return root / normalized
