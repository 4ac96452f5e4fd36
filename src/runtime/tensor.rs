//! Host tensors: a shape, a dtype and contiguous row-major storage shared behind an `Arc`, so that views of a
//! slice along the leading dimensions (`narrow`, `index`) cost no copy.

use std::sync::Arc;

use half::{bf16, f16};

use super::{DType, Element, Shape};
use crate::device::Device;
use crate::{Error, Result};

/// Owned host storage in one of the supported element types.
#[derive(Debug)]
pub enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::F32(v) => bytemuck::cast_slice(v),
            Storage::BF16(v) => bytemuck::cast_slice(v),
            Storage::F16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// Converts a typed vector into storage; implemented for every [`Element`].
pub trait IntoStorage: Element {
    fn into_storage(v: Vec<Self>) -> Storage;
}

impl IntoStorage for f32 {
    fn into_storage(v: Vec<Self>) -> Storage {
        Storage::F32(v)
    }
}

impl IntoStorage for bf16 {
    fn into_storage(v: Vec<Self>) -> Storage {
        Storage::BF16(v)
    }
}

impl IntoStorage for f16 {
    fn into_storage(v: Vec<Self>) -> Storage {
        Storage::F16(v)
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    storage: Arc<Storage>,
    /// First element of this view inside `storage`.
    offset: usize,
    shape: Shape,
    device: Device,
}

impl Tensor {
    pub fn from_vec<T: IntoStorage>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!(
                    "{} elements for shape {shape} ({} expected)",
                    data.len(),
                    shape.numel()
                ),
            ));
        }
        Ok(Tensor {
            storage: Arc::new(T::into_storage(data)),
            offset: 0,
            shape,
            device: Device::Cpu,
        })
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType) -> Self {
        let shape = shape.into();
        let n = shape.numel();
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
        };
        Tensor {
            storage: Arc::new(storage),
            offset: 0,
            shape,
            device: Device::Cpu,
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The elements of this view, borrowed without a copy; errors if `T` is not the tensor's dtype.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype() {
            return Err(Error::invalid(
                "dtype",
                format!(
                    "tensor of shape {} is {}, read as {}",
                    self.shape,
                    self.dtype(),
                    T::DTYPE
                ),
            ));
        }
        let bytes = self.storage.bytes();
        let all: &[T] = bytemuck::cast_slice(bytes);
        Ok(&all[self.offset..self.offset + self.numel()])
    }

    /// Copies the view out as f32, converting from the storage dtype.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        let range = self.offset..self.offset + self.numel();
        match self.storage.as_ref() {
            Storage::F32(v) => v[range].to_vec(),
            Storage::BF16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v[range].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// A new tensor holding this view converted to `dtype` (round to nearest even when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        let values = self.to_vec_f32();
        let storage = match dtype {
            DType::F32 => Storage::F32(values),
            DType::BF16 => Storage::BF16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => Storage::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
        };
        Tensor {
            storage: Arc::new(storage),
            offset: 0,
            shape: self.shape.clone(),
            device: self.device,
        }
    }

    /// Same elements, new shape with the same element count. No copy.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("cannot view {} as {shape}", self.shape),
            ));
        }
        Ok(Tensor {
            shape,
            ..self.clone()
        })
    }

    /// The view `start..start+len` along `dim`. It is contiguous, hence free, only when every dimension
    /// before `dim` has extent 1; other cases are refused rather than silently copied.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let extent = self.shape.dim(dim)?;
        if start + len > extent {
            return Err(Error::invalid(
                "narrow",
                format!(
                    "range {start}..{} outside dimension {dim} of extent {extent}",
                    start + len
                ),
            ));
        }
        if self.dims()[..dim].iter().any(|&d| d != 1) {
            return Err(Error::invalid(
                "narrow",
                format!(
                    "a slice of dimension {dim} of {} is not contiguous",
                    self.shape
                ),
            ));
        }
        let stride = self.shape.strides()[dim];
        let mut dims = self.dims().to_vec();
        dims[dim] = len;
        Ok(Tensor {
            storage: self.storage.clone(),
            offset: self.offset + start * stride,
            shape: dims.into(),
            device: self.device,
        })
    }

    /// The `i`-th entry along the first dimension, with that dimension removed.
    pub fn index(&self, i: usize) -> Result<Tensor> {
        let view = self.narrow(0, i, 1)?;
        view.reshape(self.dims()[1..].to_vec())
    }

    /// True when both views share storage (used to check that views are free).
    pub fn shares_storage_with(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_and_index_are_views_with_the_right_elements() {
        let t = Tensor::from_vec((0..24).map(|x| x as f32).collect::<Vec<_>>(), [2, 3, 4]).unwrap();
        let row = t.index(1).unwrap();
        assert_eq!(row.dims(), &[3, 4]);
        assert!(row.shares_storage_with(&t));
        let part = row.narrow(0, 1, 2).unwrap();
        assert_eq!(
            part.as_slice::<f32>().unwrap(),
            &(16..24).map(|x| x as f32).collect::<Vec<_>>()[..]
        );
        assert!(
            t.narrow(1, 0, 2).is_err(),
            "a non-contiguous narrow must be refused"
        );
        assert!(
            t.narrow(0, 1, 2).is_err(),
            "an out-of-range narrow must be refused"
        );
    }

    #[test]
    fn dtype_conversion_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly halfway between two bf16 values; RNE keeps the even mantissa (1.0).
        let t = Tensor::from_vec(vec![1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], [2]).unwrap();
        let b = t.to_dtype(DType::BF16);
        assert_eq!(b.as_slice::<bf16>().unwrap()[0].to_f32(), 1.0);
        assert_eq!(b.as_slice::<bf16>().unwrap()[1].to_f32(), 1.0 + 4.0 / 256.0);
        assert!(b.as_slice::<f32>().is_err());
    }

    #[test]
    fn shape_errors_are_reported() {
        assert!(Tensor::from_vec(vec![0.0f32; 5], [2, 3]).is_err());
        let t = Tensor::zeros([2, 3], DType::F16);
        assert!(t.reshape([5]).is_err());
        assert_eq!(t.reshape([3, 2]).unwrap().dims(), &[3, 2]);
    }
}
