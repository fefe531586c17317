//! Rolling-element bearing kinematics: defect frequencies from geometry and shaft speed.

/// Geometry of a rolling-element bearing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BearingGeometry {
    pub balls: u32,
    /// Ball (roller) diameter, m.
    pub ball_diameter: f64,
    /// Pitch diameter, m.
    pub pitch_diameter: f64,
    /// Contact angle, rad.
    pub contact_angle: f64,
}

/// Characteristic defect frequencies, Hz.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DefectFrequencies {
    /// Ball pass frequency, outer race.
    pub bpfo: f64,
    /// Ball pass frequency, inner race.
    pub bpfi: f64,
    /// Ball spin frequency.
    pub bsf: f64,
    /// Fundamental train (cage) frequency.
    pub ftf: f64,
}

impl BearingGeometry {
    /// Defect frequencies at shaft frequency `shaft_hz` (stationary outer race).
    pub fn defect_frequencies(&self, shaft_hz: f64) -> DefectFrequencies {
        let r = self.ball_diameter / self.pitch_diameter * self.contact_angle.cos();
        let n = f64::from(self.balls);
        DefectFrequencies {
            bpfo: n / 2.0 * shaft_hz * (1.0 - r),
            bpfi: n / 2.0 * shaft_hz * (1.0 + r),
            bsf: self.pitch_diameter / (2.0 * self.ball_diameter) * shaft_hz * (1.0 - r * r),
            ftf: shaft_hz / 2.0 * (1.0 - r),
        }
    }
}

/// High-speed-shaft bearing of the simulated 3 MW wind turbine (a 6322-class deep-groove
/// ball bearing) where its vibration sensor sits.
pub const WIND_TURBINE_HSS_BEARING: BearingGeometry = BearingGeometry {
    balls: 9,
    ball_diameter: 0.0222,
    pitch_diameter: 0.110,
    contact_angle: 0.0,
};

/// Gearbox ratio between the rotor and the high-speed shaft of that turbine.
pub const WIND_TURBINE_GEAR_RATIO: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textbook_relations_hold() {
        let d = WIND_TURBINE_HSS_BEARING.defect_frequencies(25.0);
        // BPFO + BPFI = n × shaft; FTF = BPFO / n.
        assert!((d.bpfo + d.bpfi - 9.0 * 25.0).abs() < 1e-9);
        assert!((d.ftf - d.bpfo / 9.0).abs() < 1e-9);
        assert!((d.bpfo - 89.80).abs() < 0.01, "{}", d.bpfo);
    }
}
