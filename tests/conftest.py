import pytest

from lib.data.synthetic import generate


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny synthetic dataset (8 maps x 2 transmitters, 32 px), made once per session."""
    root = tmp_path_factory.mktemp("data") / "city"
    generate(root, num_maps=8, tx_per_map=2, seed=0, size=32, cars=True, log=lambda m: None)
    return root


@pytest.fixture
def trainer(request, tiny_data):
    """One of tests.helpers.TRAINERS (parametrize with indirect=True), bound to the tiny data."""
    from dataclasses import replace

    from tests.helpers import TRAINERS
    return replace(TRAINERS[request.param], data_root=tiny_data)


@pytest.fixture(scope="session")
def city(tmp_path_factory):
    """A tiny read-only dataset: 6 maps x 3 transmitters x 6 simulations, 32 px."""
    from tests.helpers import CITY_MAPS, CITY_SIZE, CITY_TX, quiet
    root = tmp_path_factory.mktemp("data") / "city6"
    generate(root, CITY_MAPS, CITY_TX, seed=0, size=CITY_SIZE, log=quiet)
    return root


@pytest.fixture(scope="session")
def rms_like(tmp_path_factory):
    """A RadioMapSeer-shaped folder (701 maps x 3 transmitters, IRT4 for transmitters 0-1, cars,
    8 px; tests/helpers.py: radiomapseer_like), made once per session, read-only."""
    from tests.helpers import radiomapseer_like
    return radiomapseer_like(tmp_path_factory.mktemp("rms") / "RadioMapSeer")
