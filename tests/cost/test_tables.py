"""Component tables: shipped ones load, nonsense fails with one clear line, fitted values re-derive."""

import pytest
import yaml

from cimattn.cost import list_tables, load_table
from cimattn.cost.gpu import fit_efficiency, load_gpus
from cimattn.cost.tables import _TABLES
from cimattn.cost.validate import refit
from cimattn.errors import CimattnError


def test_shipped_tables_load_with_provenance():
    assert {"leroux-gaincell", "sprint", "hyatt"} <= set(list_tables())
    for name in list_tables():
        for key, q in load_table(name).quantities().items():
            assert q.provenance in ("sourced", "fitted", "assumed"), key
    assert load_gpus().gpus["h100-sxm"].bandwidth.value == 3.35e12


def _broken(tmp_path, edit):
    data = yaml.safe_load((_TABLES / "leroux-gaincell.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["components"]["cell"]["read_energy_j"].update(value=-1e-15), "'components.cell': parameter 'read_energy_j': field 'value': Input should be greater than or equal to 0"),
    (lambda d: d["components"]["dac"]["energy_per_level_j"].pop("unit"), "no unit"),
    (lambda d: d["components"]["dac"]["energy_per_level_j"].update(unit="pJ"), "expected 'J'"),
    (lambda d: d["components"].update(flux_capacitor={"energy_j": {"value": 1, "unit": "J", "source": "x"}}), "unknown component 'flux_capacitor'"),
    (lambda d: d["components"]["cell"].update(colour_j={"value": 1, "unit": "J", "source": "x"}), "unknown parameter 'cell.colour_j'"),
    (lambda d: d["components"]["cell"].pop("area_m2"), "cell.area_m2"),
    (lambda d: d["components"]["cell"]["read_energy_j"].pop("fitted_to"), "source / fitted_to / assumed"),
    (lambda d: d.pop("components"), "components"),
])
def test_bad_tables_fail_with_a_clear_line(tmp_path, edit, needle):
    with pytest.raises(CimattnError) as e:
        load_table(_broken(tmp_path, edit))
    message = str(e.value)
    assert needle in message and "\n" not in message, message


def test_unknown_table_name():
    with pytest.raises(CimattnError, match="unknown cost table"):
        load_table("no-such-table")


def test_fitted_values_rederive_from_their_figures():
    """Every value marked fitted in the YAML is what solving its published figure gives (to 0.1 %)."""
    from cimattn.cost.validate import figures, params

    P = params()
    fitted = {n for f in figures() if f.kind == "fitted" for n in f.fits}
    start = {k: v * 1.3 if k in fitted else v for k, v in P.items()}  # start away from the answer
    solved = refit(start)
    assert solved, "no fitted parameters found"
    for name, value in solved.items():
        assert value == pytest.approx(float(P[name]), rel=1e-3), name
    closed = fit_efficiency()
    assert closed["efficiency.bandwidth_fraction"] == pytest.approx(float(P["gpu.efficiency.bandwidth_fraction"]), rel=1e-4)
