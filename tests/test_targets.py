import pytest

from edgevit.errors import ConfigError
from edgevit.targets import list_targets, load_target

REQUIRED = {"host", "rasp4b", "jetson-orin", "jetson-orin-nano", "jetson-xavier",
            "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90"}


def test_required_targets_exist():
    assert REQUIRED <= {t.name for t in list_targets()}


@pytest.mark.tvm
@pytest.mark.parametrize("target", list_targets(), ids=lambda t: t.name)
def test_tvm_accepts_every_target(target):
    t = target.tvm_target()
    assert t.kind.name == target.tvm["kind"]
    if target.device == "cuda":
        assert t.host is not None and t.attrs["arch"] == target.tvm["arch"]
        assert ("aarch64" in str(t.host.attrs.get("mtriple", ""))) == (target.arch == "aarch64")


def test_aliases_and_paths():
    assert load_target("jetson").name == "jetson-orin"
    assert load_target("arm").name == "rasp4b"
    assert load_target("cuda").tvm["arch"] == "sm_86"
    path = load_target("rasp4b")
    assert load_target(str(__import__("edgevit.targets").targets.targets_dir() / "rasp4b.toml")) == path


def test_unknown_target_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown target 'jetsn'; did you mean 'jetson-orin'\\? valid targets: "
                                          "cuda-sm80.*rasp4b"):
        load_target("jetsn")


@pytest.mark.parametrize("text, message", [
    ('description = "x"\ndevice = "cpu"\narch = "x86_64"\n[tvm]\nkind = "llvm"\nmcpu = "native"\nrpckey = 1\n', None),
    ('description = "x"\ndevice = "cpu"\narch = "x86_64"\nrpckey = "k"\n[tvm]\nkind = "llvm"\n', "did you mean 'rpc_key'"),
    ('description = "x"\ndevice = "gpu"\narch = "x86_64"\n[tvm]\nkind = "cuda"\n', "device 'gpu' must be one of"),
    ('description = "x"\ndevice = "cpu"\narch = "x86_64"\n[tvm]\nkind = "cuda"\n', "does not match device"),
    ('description = "x"\ndevice = "cpu"\narch = "riscv"\n[tvm]\nkind = "llvm"\n', "arch 'riscv'"),
])
def test_bad_target_files(tmp_path, text, message):
    p = tmp_path / "board.toml"
    p.write_text(text)
    if message is None:   # unknown keys inside [tvm] are TVM's business: it rejects them on use
        target = load_target(str(p))
        with pytest.raises(ConfigError, match="TVM rejects"):
            target.tvm_target()
        return
    with pytest.raises(ConfigError, match=message):
        load_target(str(p))


def test_missing_cross_compiler_names_the_debian_package(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(Exception, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        load_target("rasp4b").check_cross_compiler()
