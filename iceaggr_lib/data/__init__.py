"""The data layer: the Kaggle layout reader, detector geometry, and the calibrated sample generator.

* ``geometry``: ``load_geometry`` (sensor_geometry.csv -> (n_sensors, 3) array), the shipped IC86 file.
* ``kaggle``: ``KaggleDataset`` (events, DomBatches and whole-file PulseTables from the Kaggle layout).
* ``sample``: ``generate_table`` / ``write_dataset``, the physics-flavoured embedded sample.
* ``errors``: ``DataFormatError``, raised for bad input with the file and the problem named.
"""

from iceaggr_lib.data.errors import DataFormatError
from iceaggr_lib.data.geometry import default_geometry_path, load_geometry
from iceaggr_lib.data.kaggle import KaggleDataset
from iceaggr_lib.data.sample import generate_table, write_dataset

__all__ = ["DataFormatError", "KaggleDataset", "default_geometry_path", "generate_table", "load_geometry",
           "write_dataset"]
