"""What the device shows the person who pressed: plain data, no hardware (so the pure SOS core
can name these states without importing gpiozero). The patterns are in feedback.py."""

from enum import StrEnum


class FeedbackState(StrEnum):
    IDLE = "idle"
    SENDING = "sending"  # triggered, no delivery receipt from the centre yet
    DELIVERED = "delivered"  # the centre's signed delivery receipt arrived: it has the alert
    ACKNOWLEDGED = "acknowledged"  # an operator took it
    RETRYING = "retrying"  # sending failed, retrying
    CANCELLED = "cancelled"  # the device sent a cancel request
    CLOSED = "closed"  # the operator closed it (returning to IDLE is the device's business)
    CALL_STARTED = "call_started"  # the wearer's gesture started a call's recording
    CALL_ENDED = "call_ended"  # the wearer's gesture ended it
