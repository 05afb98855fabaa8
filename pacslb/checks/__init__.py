"""Health checks: one module per kind (tcp, http, dicom_echo) and the monitor that runs them."""
