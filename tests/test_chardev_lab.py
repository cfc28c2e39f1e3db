"""The lab's ``--chardev`` wiring, without root: QEMU command lines and the daemons' configs."""

from __future__ import annotations

from pathlib import Path

from coloproxy.config import parse_config
from coloproxy.lab import vms
from coloproxy.lab.configs import LabPaths, chardev_config_text, config_text


def argv(role: str, **mode: bool) -> list[str]:
    spec = vms.VmSpec(
        role=role,
        binary=Path("qemu"),
        firmware=Path("fw"),
        kernel=Path("k"),
        initrd=Path("i"),
        accel="tcg",
        paths=LabPaths(Path("/run/c5lab")),
        **mode,
    )
    return vms.qemu_argv(spec)


def test_host_p_keeps_its_filters_and_loses_colo_compare() -> None:
    line = " ".join(argv("primary", chardev=True))
    assert "vnet_hdr=off" in line
    assert "colo-compare" not in line and "iothread" not in line
    for gone in ("compare1", "compare0-0", "compare_out0"):
        assert f"id={gone}," not in line
    for kept in (
        "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
        "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out",
        "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0",
        "socket,id=compare0,host=127.0.0.1,port=7795,server=on,wait=off",
        "socket,id=compare_out,host=127.0.0.1,port=7796,server=on,wait=off",
    ):
        assert kept in line
    # Host S is wired exactly as with QEMU's colo-compare.
    assert argv("secondary", chardev=True) == argv("secondary", qemu_filters=True)
    # And the default mode is untouched.
    assert "filter-" not in " ".join(argv("primary"))


def test_the_daemons_configs() -> None:
    paths = LabPaths(Path("/run/c5lab"))
    primary = parse_config(chardev_config_text("primary", paths), "lab.yaml")
    assert primary.queues is None and primary.chardev is not None
    assert str(primary.chardev.primary_in) == "tcp:127.0.0.1:7795,client"
    assert str(primary.chardev.secondary_in) == "tcp:10.255.77.1:7794,server"
    assert str(primary.chardev.outdev) == "tcp:127.0.0.1:7796,client"
    secondary = parse_config(chardev_config_text("secondary", paths), "lab-secondary.yaml")
    assert secondary.engine.failover_object_del == ("f2", "f1")
    # Everything else as in the default mode's files.
    default = parse_config(config_text("secondary", paths), "lab-secondary.yaml")
    assert secondary.engine.period_ms == default.engine.period_ms
    assert default.engine.failover_object_del == ()
