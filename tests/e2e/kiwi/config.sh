#!/bin/bash
systemctl enable kiwispray-firstboot.service
