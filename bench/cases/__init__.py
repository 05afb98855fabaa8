"""The benchmark cases, one module each: bulk (a), dicom_store (b), connrate (c), http (d), memory (e)."""
