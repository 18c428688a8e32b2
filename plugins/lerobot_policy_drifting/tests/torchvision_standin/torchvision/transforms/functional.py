"""Imported at module level by `lerobot.processor.hil_processor` (HIL-SERL's crop-and-resize
step, not used by the plugin): any call fails loudly."""


def __getattr__(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.functional.{name} needs the real torchvision")

    return call
