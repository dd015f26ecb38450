import numpy as np
import pytest
from PIL import Image

from quantface.data import center_crop_resize, list_images, load_folder, read_image, shipped_faces, write_image
from quantface.errors import ImageError


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "RGB"])
def test_modes_are_converted_to_rgb_uint8(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.linspace(0, 65535, 600).reshape(20, 30)).astype(np.uint16))
        suffix = ".png"
    else:
        img = rgb.convert(mode)
        suffix = ".tif" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    img.save(path)
    out = read_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode == "I;16":  # scaled from 16 bits, not truncated: full range reaches 255
        assert out.max() == 255 and out.min() == 0


def test_rgba_is_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert (read_image(tmp_path / "t.png") == 255).all()


def test_unreadable_file_error_names_it(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.jpg"):
        read_image(bad)
    with pytest.raises(ImageError, match="does not exist"):
        read_image(tmp_path / "missing.png")


def test_folder_skips_and_reports_bad_files(image_folder):
    (image_folder / "zz_bad.png").write_bytes(b"\x89PNG broken")
    loaded = load_folder(image_folder, 32)
    assert len(loaded.images) == 5 and len(loaded.skipped) == 1
    assert "zz_bad.png" in loaded.report()
    assert all(im.shape == (32, 32, 3) for im in loaded.images)
    assert len(load_folder(image_folder, 32, limit=2).images) == 2


def test_folder_errors(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="contains no images"):
        list_images(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(ImageError, match="no readable images"):
        load_folder(tmp_path / "bad", 32)


def test_center_crop_resize_takes_the_centre():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 200  # the centred 40×40 square
    out = center_crop_resize(img, 20)
    assert out.shape == (20, 20, 3) and (out == 200).all()


def test_write_image_is_atomic_and_round_trips(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_image(tmp_path / "a.png", img)
    assert np.array_equal(read_image(tmp_path / "a.png"), img)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_shipped_faces_are_real_images():
    faces, names = shipped_faces(64, lfw_count=2)
    assert names == ["astronaut", "lfw_000", "lfw_001"]
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 and f.std() > 10 for f in faces)
