"""The sensor_msgs/Image converter the node uses: cv_bridge where it is installed, else the built-in one.

The built-in converter (pi_policy.node.inputs.image_to_rgb) is also the one bag replay uses, and
test/test_cv_bridge.py checks that cv_bridge gives the same pixels for every encoding the built-in one supports.
Both accept exactly the same messages: a frame is first checked by the built-in rules (encoding, sizes, step,
buffer length), so a bad frame gets the same one-line reason whichever converter is in use.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from pi_policy.node.compressed import DEFAULT_MAX_SIDE
from pi_policy.node.inputs import MessageError, check_image, image_to_rgb

# cv_bridge refuses to turn ROS's generic OpenCV types into a colour encoding; the built-in reads them as
# mono8 and bgr8 (OpenCV's channel order), so cv_bridge unpacks them as they are and OpenCV does the rest
_GENERIC = {"8UC1": cv2.COLOR_GRAY2RGB, "8UC3": cv2.COLOR_BGR2RGB}


class CvBridgeConverter:
    def __init__(self):
        from cv_bridge import CvBridge  # ImportError where cv_bridge is not installed

        self.bridge = CvBridge()

    def __call__(self, msg, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
        check_image(msg, max_side)
        try:
            if msg.encoding in _GENERIC:
                return cv2.cvtColor(self.bridge.imgmsg_to_cv2(msg, "passthrough"), _GENERIC[msg.encoding])
            return np.ascontiguousarray(self.bridge.imgmsg_to_cv2(msg, "rgb8"))
        except Exception as e:  # noqa: BLE001 - CvBridgeError, or numpy refusing the buffer: one line either way
            raise MessageError(f"cv_bridge cannot convert this {msg.encoding} image: {e}") from None


def image_converter() -> tuple[str, Callable[..., np.ndarray]]:
    """("cv_bridge", its converter) where cv_bridge imports, else ("builtin", image_to_rgb)."""
    try:
        return "cv_bridge", CvBridgeConverter()
    except ImportError:
        return "builtin", image_to_rgb
