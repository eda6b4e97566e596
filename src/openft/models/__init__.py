"""Model building and loading, and chat rendering shared by training and inference.

Importing this package registers the tiny model's processor class with ``AutoProcessor``.
"""

from openft.models import tiny as _tiny  # noqa: F401  (registration side effect)
