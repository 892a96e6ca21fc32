"""Face datasets in one shared schema; importing this registers the builders.

* ``synthetic_faces`` (configs ``tiny``, ``demo``): rendered offline, default.
* ``aflw``: the real AFLW database, manual download.

See face_schema for the feature layout and the pixel [x, y, w, h] box
convention.
"""

from dplh_jax.hyperface.datasets.aflw import Aflw
from dplh_jax.hyperface.datasets.face_schema import FLIP_PAIRS
from dplh_jax.hyperface.datasets.face_schema import FLIP_PERMUTATION
from dplh_jax.hyperface.datasets.face_schema import LANDMARK_NAMES
from dplh_jax.hyperface.datasets.face_schema import NUM_LANDMARKS
from dplh_jax.hyperface.datasets.synthetic_faces import SyntheticFaces
from dplh_jax.hyperface.datasets.synthetic_faces import SyntheticFacesConfig

__all__ = [
    'Aflw', 'FLIP_PAIRS', 'FLIP_PERMUTATION', 'LANDMARK_NAMES',
    'NUM_LANDMARKS', 'SyntheticFaces', 'SyntheticFacesConfig',
]
