"""The user's own data: image folders, sensor recordings and factories, read as the agent reads
them (real PNG/JPEG and CSV files on disk), with a message naming the file or key for every problem."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from fedprune.common.configkit import ConfigError, FreeTable
from fedprune.common.data import LocalDataError, load_local_data
from fedprune.common.data_source import DataSource
from fedprune.edge_agent.config import load_config


def _image(path, size=(6, 4), value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (value, 0, 255) if mode == "RGB" else value).save(path)


def test_an_image_folder_reads_classes_in_name_order_scaled_to_unit_range(tmp_path):
    _image(tmp_path / "cat" / "a.png", value=255)
    _image(tmp_path / "cat" / "b.jpg", value=0)
    _image(tmp_path / "dog" / "c.PNG")
    (tmp_path / "empty").mkdir()  # keeps its class index so that devices agree
    _image(tmp_path / "zebra" / "d.jpeg")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    X, y = load_local_data(tmp_path, DataSource(format="image_folder"))
    assert X.shape == (4, 3, 4, 6) and X.dtype == np.float32
    assert list(y) == [0, 0, 1, 3] and y.dtype == np.int64
    assert X.min() >= 0 and X.max() <= 1 and X[0, 0].mean() == pytest.approx(1.0)
    assert X[0, 2].mean() == pytest.approx(1.0) and X[0, 1].mean() == pytest.approx(0.0)


def test_an_image_folder_resizes_and_converts_to_grayscale(tmp_path):
    _image(tmp_path / "a" / "1.png", size=(10, 20))
    _image(tmp_path / "b" / "2.jpg", size=(3, 3), mode="L", value=255)
    X, y = load_local_data(tmp_path, DataSource(format="image_folder", image_size=(8, 5), grayscale=True))
    assert X.shape == (2, 1, 8, 5) and list(y) == [0, 1]
    assert X[1].min() > 0.95


@pytest.mark.parametrize("setup, message", [
    (lambda p: _image(p / "a" / "1.png", size=(4, 4)) or _image(p / "b" / "2.png", size=(5, 4)),
     r"2\.png: 5x4 pixels, the first image has 4x4; set \[data\] image_size"),
    (lambda p: (p / "a").mkdir() or (p / "a" / "broken.png").write_bytes(b"\x89PNG not really"),
     r"broken\.png: unreadable image .*replace or remove it"),
    (lambda p: (p / "a").mkdir(), r"no \.png or \.jpg images"),
    (lambda p: None, "no class subfolders"),
])
def test_image_folder_problems_name_the_file_and_the_fix(tmp_path, setup, message):
    root = tmp_path / "images"
    root.mkdir()
    setup(root)
    with pytest.raises(LocalDataError, match=message) as info:
        load_local_data(root, DataSource(format="image_folder"))
    assert "images" in str(info.value)


SENSOR = "t,ax,ay,label\n" + "".join(f"{t},{t},{10 * t},{t % 3}\n" for t in range(10))


def test_sensor_csv_windows_take_the_last_rows_label_and_never_cross_files_or_gaps(tmp_path):
    (tmp_path / "a.csv").write_text(SENSOR)
    X, y = load_local_data(tmp_path / "a.csv", DataSource(format="sensor_csv", window=4, stride=2))
    assert X.shape == (4, 2, 4) and X.dtype == np.float32
    assert X[0, 0].tolist() == [0, 1, 2, 3] and X[0, 1].tolist() == [0, 10, 20, 30]
    assert y.tolist() == [3 % 3, 5 % 3, 7 % 3, 9 % 3]

    (tmp_path / "b.csv").write_text("t,ax,ay,label\n" + "".join(f"{t},{t},0,1\n" for t in (0, 1, 2, 10, 11, 12, 13)))
    X, y = load_local_data(tmp_path, DataSource(format="sensor_csv", window=3, stride=1, max_gap=2.0))
    starts = [w[0, 0] for w in X]  # a.csv: 8 windows; b.csv: [0,1,2] and two after the gap, none across it
    assert starts == [0, 1, 2, 3, 4, 5, 6, 7, 0, 10, 11]
    X, _ = load_local_data(tmp_path, DataSource(format="sensor_csv", window=3, stride=1))
    assert len(X) == 8 + 5  # no max_gap: only the files end a recording


def test_sensor_csv_names_columns_and_keeps_several_targets(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("x,time,y,hot,cold\n" + "".join(f"{i},2026-01-01T00:00:{i:02d},{-i},{i % 2},0.5\n" for i in range(6)))
    X, y = load_local_data(path, DataSource(format="sensor_csv", window=3, timestamp_column="time", label_columns=2,
                                            max_gap=1.5))
    assert X.shape == (2, 2, 3) and X[1, 1].tolist() == [-3, -4, -5]
    assert y.shape == (2, 2) and y.dtype == np.float32 and y.tolist() == [[0, 0.5], [1, 0.5]]


@pytest.mark.parametrize("text, source, message", [
    ("t,a,label\n0,1,0\n", DataSource(format="sensor_csv", window=5), r"no recording .* has 5 rows; lower \[data\] window"),
    ("t,a,label\n2,1,0\n1,1,0\n", DataSource(format="sensor_csv", window=1), r"timestamps go back at data row 3"),
    ("t,a,label\n0,1\n", DataSource(format="sensor_csv", window=1), r"data row 2 has 2 cells"),
    ("t,a,label\nnoon,1,0\n", DataSource(format="sensor_csv", window=1), r"timestamp 'noon' is neither"),
    ("t,a,label\n0,x,0\n", DataSource(format="sensor_csv", window=1), r"data row 2"),
    ("t,a,label\n0,nan,0\n", DataSource(format="sensor_csv", window=1), r"NaN"),
    ("t,a,label\n0,1,0\n", DataSource(format="sensor_csv", window=1, timestamp_column="time"),
     r"no column 'time' \(\[data\] timestamp_column\)"),
    ("t,label\n0,0\n", DataSource(format="sensor_csv", window=1), r"at least one channel column"),
])
def test_sensor_csv_problems_name_the_file(tmp_path, text, source, message):
    path = tmp_path / "rec.csv"
    path.write_text(text)
    with pytest.raises(LocalDataError, match=message) as info:
        load_local_data(path, source)
    assert "rec.csv" in str(info.value)


FACTORY = '''
import numpy as np

def load(path, scale=1.0, rows=4):
    X = np.full((rows, 3), scale, dtype=np.float64)
    return X, np.arange(rows) % 2

def tensors(path):
    return [1, 2]

def broken(path):
    raise RuntimeError("disk on fire")

def nan(path):
    return np.full((2, 2), np.nan), np.zeros(2)
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "userdata.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userdata"
    sys.modules.pop("userdata", None)


def test_a_factory_is_called_with_the_path_and_its_args_and_checked_like_a_file(tmp_path, factory_module):
    source = DataSource(format="factory", factory="userdata:load", args=FreeTable({"scale": 2.5, "rows": 3}))
    X, y = load_local_data(tmp_path / "anything", source)
    assert X.shape == (3, 3) and X.dtype == np.float32 and np.all(X == 2.5) and y.tolist() == [0, 1, 0]


@pytest.mark.parametrize("spec, message", [
    ("nosuchpkg.data:load", r"cannot import 'nosuchpkg.data' .*add its folder to PYTHONPATH"),
    ("userdata:missing", r"userdata has no attribute 'missing'"),
    ("userdata:tensors", r"returned list of int, int; it must return a tuple \(X, y\) of numpy arrays"),
    ("userdata:broken", r"failed: RuntimeError: disk on fire"),
    ("userdata:nan", r"X contains NaN"),
])
def test_factory_problems_name_the_factory_and_the_fix(tmp_path, factory_module, spec, message):
    with pytest.raises(LocalDataError, match=message) as info:
        load_local_data(tmp_path / "d", DataSource(format="factory", factory=spec))
    assert str(tmp_path / "d") in str(info.value)
    if spec != "userdata:nan":
        assert spec in str(info.value)


def test_agent_toml_data_section_reaches_the_loader(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[data]\nformat = "factory"\nfactory = "userdata:load"\n[data.args]\nscale = 2\n')
    loaded = load_config(config, env={})
    assert loaded.data.factory == "userdata:load" and dict(loaded.data.args) == {"scale": 2}
    assert DataSource.from_dict(loaded.data.to_dict()) == loaded.data  # what the training child receives
    assert load_config(None, env={}).data == DataSource()


@pytest.mark.parametrize("toml, message", [
    ('format = "parquet"', r"\[data\] format 'parquet': expected one of"),
    ("windows = 3", r"\[data\] windows: unknown key"),
    ('format = "factory"', r'\[data\] factory: format = "factory" needs factory ='),
    ('factory = "not a path"', r"\[data\] factory 'not a path': expected an import path"),
    ('format = "sensor_csv"', r"\[data\] window: sensor_csv needs window"),
    ('format = "image_folder"\nimage_size = [3]', r"\[data\] image_size \(3,\): expected \[height, width\]"),
    ('format = "npz"\nwindow = 4', r"\[data\] window: only used with format = sensor_csv, not 'npz'"),
    ('format = "sensor_csv"\nwindow = 4\nmax_gap = -1', r"\[data\] max_gap -1.0: expected"),
    ('factory = "m:f"\n[data.args]\n"not-a-name" = 1', r"\[data\] args .*Python argument names, not 'not-a-name'"),
    ('format = "csv"\nfactory = "m:f"', r"only read with format = \"factory\""),
])
def test_bad_data_settings_are_refused_at_load_naming_the_key(tmp_path, toml, message):
    config = tmp_path / "agent.toml"
    config.write_text(f"[data]\n{toml}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(config, env={})


def test_the_training_child_reads_the_data_as_the_daemon_does(tmp_path):
    """The child gets the daemon's [data] through its msgpack job: an image folder, not npz/csv."""
    from fedprune.edge_agent.worker import TrainJob, WorkerError, train_in_child
    from fedprune.protocol.hyperparams import HyperParams
    from fedprune.protocol.messages import ModelRef

    _image(tmp_path / "imgs" / "a" / "1.png")
    _image(tmp_path / "imgs" / "b" / "bad.png")
    (tmp_path / "imgs" / "b" / "bad.png").write_bytes(b"junk")
    job = TrainJob(model=ModelRef("mlp", (3, 4, 6), 2), params={}, masks={}, hyper=HyperParams(),
                   data_path=tmp_path / "imgs", device="cpu", threads=1,
                   data_source=DataSource(format="image_folder"))
    with pytest.raises(WorkerError, match=r"LocalDataError: .*bad\.png: unreadable image"):
        train_in_child(job)
