"""Memory budgets: how many samples a replay memory may keep, and how they split over classes."""
from __future__ import annotations

from streamcl.errors import ConfigError


class Budget:
    """A fixed ``total`` split evenly over the classes seen so far, or a fixed number ``per_class``.

    With a total, each of the first ``total % n`` classes (in the order given) gets one sample more,
    so the quotas always add up to the total (iCaRL's m = K / t, Rebuffi et al. 2017, Alg. 1).
    """

    def __init__(self, total: int | None = None, per_class: int | None = None):
        if (total is None) == (per_class is None):
            raise ConfigError("a memory budget takes exactly one of total= or per_class=")
        for name, value in (("total", total), ("per_class", per_class)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"memory budget {name}={value!r}: it must be a positive whole number of samples "
                                  "(for no memory at all, leave the replay plugin out)")
        self.total, self.per_class = total, per_class

    def quotas(self, classes: list[int]) -> dict[int, int]:
        """How many samples each class may keep."""
        if self.per_class is not None:
            return {c: self.per_class for c in classes}
        if not classes:
            return {}
        base, extra = divmod(self.total, len(classes))
        return {c: base + (i < extra) for i, c in enumerate(classes)}

    def __repr__(self) -> str:
        return f"Budget(total={self.total})" if self.total is not None else f"Budget(per_class={self.per_class})"


def check_room(capacity: int, n_classes: int, who: str, instead: str = "") -> None:
    """Refuse a class-balanced memory of ``capacity`` samples on a stream of more classes: some class would get
    no sample, and the budget split leaves others a quota of 0. ``instead`` names another way, if there is one."""
    if capacity < n_classes:
        raise ConfigError(f"{who}: the memory holds {capacity} samples but the stream has {n_classes} classes, and "
                          f"class-balanced selection needs at least one sample per class; raise memory to at least "
                          f"{n_classes}{instead}")
