"""pacslb: a load balancer for medical-imaging (PACS) clusters that understands DICOM."""

__version__ = "0.1.0"
