"""More than one balancer: keepalived integration (keepalived.py: the generated keepalived.conf), the role
keepalived reports (role.py) and how keepalived finds this balancer's process (process.py).
docs/high-availability.md has the deployment. pacslb never speaks VRRP itself: keepalived moves the address.
"""
