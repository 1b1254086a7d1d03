"""Figures: the embedding scatter's group panel has a legend and clearly different colours."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fairkernels import plots  # noqa: E402


def _figure(num_groups, group_names=None):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(200, 5))
    groups = np.arange(200) % num_groups
    return plots.embedding_figure(embeddings, rng.integers(0, 3, 200), groups, group_names=group_names)


def test_group_panel_has_a_legend_naming_every_group():
    import matplotlib.pyplot as plt
    fig = _figure(2, group_names=("original", "reversed"))
    legend = fig.axes[1].get_legend()
    assert legend is not None and [text.get_text() for text in legend.get_texts()] == ["original", "reversed"]
    assert [text.get_text() for text in _figure(3).axes[1].get_legend().get_texts()] == \
        ["group 0", "group 1", "group 2"]
    plt.close("all")


def _group_colours(num_groups):
    import matplotlib.pyplot as plt
    fig = _figure(num_groups)
    colours = np.array([collection.get_facecolor()[0][:3] for collection in fig.axes[1].collections])
    plt.close(fig)
    assert colours.shape == (num_groups, 3)
    return colours


@pytest.mark.parametrize("num_groups", [2, 3, 10, 20])
def test_group_colours_are_distinct(num_groups):
    colours = _group_colours(num_groups)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)[np.triu_indices(num_groups, 1)]
    assert distances.min() > 0.05


def test_two_groups_get_different_hues():
    """The old colormap normalisation gave groups 0 and 1 a blue and a cyan (hues 19 degrees apart)."""
    from matplotlib.colors import rgb_to_hsv
    hue = rgb_to_hsv(_group_colours(2))[:, 0] * 360
    assert min(abs(hue[0] - hue[1]), 360 - abs(hue[0] - hue[1])) > 90


def test_category_colours_cycle_a_qualitative_palette():
    import matplotlib.pyplot as plt
    two = plots.category_colours(np.array([0, 1, 1]), plt)
    assert two.shape == (3, 4) and np.linalg.norm(two[0, :3] - two[1, :3]) > 0.3
    many = plots.category_colours(np.arange(30), plt)
    assert many.shape == (30, 4) and np.isfinite(many).all()


def test_embedding_scatter_writes_a_png(tmp_path):
    rng = np.random.default_rng(1)
    path = plots.embedding_scatter(rng.normal(size=(50, 3)), rng.integers(0, 2, 50), rng.integers(0, 2, 50),
                                   str(tmp_path / "e.png"), title="t")
    assert (tmp_path / "e.png").stat().st_size > 1000 and path.endswith("e.png")
