import json
import pickle

import numpy as np
import pyarrow as pa

from raypipe import schema
from raypipe.io.normalize import InputColumns, normalize_table, normalize_webdataset
from raypipe.io.readers import SidecarJoin
from raypipe.schema import Status


def _obj(values):
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def test_img2dataset_parquet_rows_keep_keys_and_failed_downloads_are_marked():
    batch = {
        "key": _obj(["000", "001", "002"]),
        "jpg": _obj([b"\xff\xd8jpeg", None, b""]),
        "caption": _obj(["a cat", None, "x"]),
        "status": _obj(["success", "failed_to_download", "success"]),
        "error_message": _obj([None, "HTTP Error 404: Not Found", None]),
        "path": _obj(["s/0.parquet"] * 3),
        "id": np.array([7, 8, 9]),
    }
    out = normalize_table(batch, InputColumns(extra=("id",)))
    assert list(out[schema.KEY]) == ["000", "001", "002"]
    assert out[schema.IMAGE][0] == b"\xff\xd8jpeg" and out[schema.IMAGE][1] is None and out[schema.IMAGE][2] is None
    assert list(out[schema.TEXT]) == ["a cat", "", "x"]
    assert list(out[schema.STATUS]) == ["ok", Status.NOT_DOWNLOADED.value, "ok"]
    assert "404" in out[schema.ERROR_MESSAGE][1] and "failed_to_download" in out[schema.ERROR_MESSAGE][1]
    assert list(out["id"]) == [7, 8, 9] and list(out[schema.SOURCE]) == ["s/0.parquet"] * 3


def test_plain_table_with_configured_columns():
    batch = {"uid": np.array([1, 2]), "img": _obj([b"a", b"b"]), "alt": _obj(["t1", "t2"])}
    out = normalize_table(batch, InputColumns(key="uid", image="img", text="alt"))
    assert list(out[schema.KEY]) == ["1", "2"] and list(out[schema.STATUS]) == ["ok", "ok"]


def test_webdataset_samples_take_passthrough_from_json_and_survive_missing_members():
    meta = json.dumps({"id": 42, "label": "park", "caption": "from json"}).encode()
    samples = [
        ("00000001", {"jpg": b"\xff\xd8", "txt": b"caption \xc3\xa9", "json": meta}),
        ("00000002", {"txt": b"text", "json": b"{not json"}),  # no image member
        ("00000003", {"png": b"\x89PNG", "json": meta}),  # no text member: the caption in the json
    ]
    out = normalize_webdataset(samples, "s3://b/00000.tar", InputColumns(extra=("id", "label")))
    assert list(out[schema.KEY]) == ["00000001", "00000002", "00000003"]
    assert out[schema.IMAGE][1] is None and out[schema.IMAGE][2] == b"\x89PNG"
    assert list(out[schema.TEXT]) == ["caption é", "text", "from json"]
    assert list(out["id"]) == [42, None, 42] and list(out["label"]) == ["park", None, "park"]
    assert list(out[schema.SOURCE]) == ["s3://b/00000.tar"] * 3
    assert list(out[schema.STATUS]) == ["ok"] * 3


def test_status_columns_recover_from_ray_null_columns():
    # Ray hands an all-null Arrow column to the next stage as float32 NaN.
    batch = {schema.KEY: _obj(["a"]), schema.STATUS: _obj(["ok"]), schema.ERROR_MESSAGE: np.array([np.nan], np.float32)}
    schema.ensure_status_columns(batch)
    schema.mark_failed(batch, 0, Status.MISSING_IMAGE, "no bytes")
    assert batch[schema.ERROR_MESSAGE][0] == "no bytes"


def test_sidecar_join_is_a_left_join_with_its_lookup_built_once_per_process():
    sidecar = pa.table({"id": ["7", "8", "9"], "category": ["tomato", "lime", "sky"], "probs": [[0.9], [0.5], [0.7]]})
    join = SidecarJoin(sidecar, "id")
    batch = {schema.KEY: _obj(["a", "b", "c", "d"]), "id": _obj([9, None, 7, 12])}  # ints, as Parquet ids are
    out = join(batch)
    assert list(out["category"]) == ["sky", None, "tomato", None]
    assert list(out["probs"][0]) == [0.7] and out["probs"][1] is None
    shipped = pickle.loads(pickle.dumps(join))  # as each Ray task receives it
    assert shipped.token == join.token and shipped._rows() is join._rows()
    other = SidecarJoin(sidecar.slice(0, 1), "id")
    assert list(other({"id": _obj(["7", "9"])})["category"]) == ["tomato", None]
    assert join._rows() == {"7": 0, "8": 1, "9": 2}  # rebuilt after the other sidecar replaced it
