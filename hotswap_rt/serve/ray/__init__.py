"""Scale-out on Ray Serve (ray extra): :func:`~.app.build_ray_app`, :func:`~.app.app_builder`."""
